//! What the fuzz targets share: splitting one input into the several inputs a parser takes,
//! and the checks every error must pass (a clear message, the right CNI code).

use cni::{CniError, ErrorCode};

/// Splits `data` at NUL bytes into `n` fields (missing ones are empty, the last takes the
/// rest). NUL never occurs in JSON, YAML or CNI_ARGS text, so a seed is its fields joined
/// by `\0` and the mutator still reaches every field.
pub fn fields(data: &[u8], n: usize) -> Vec<&[u8]> {
    let mut out: Vec<&[u8]> = data.splitn(n, |&b| b == 0).collect();
    out.resize(n, &[]);
    out
}

/// A field as text, bad UTF-8 replaced (the CNI environment and Kubernetes annotations are
/// strings by the time our code sees them).
pub fn text(field: &[u8]) -> String {
    String::from_utf8_lossy(field).into_owned()
}

/// The CNI codes a config or environment parser may answer with.
const PARSE_CODES: &[ErrorCode] =
    &[ErrorCode::INCOMPATIBLE_VERSION, ErrorCode::INVALID_ENV, ErrorCode::DECODE, ErrorCode::INVALID_CONFIG];

/// A CNI error from a parser: one of the parse codes and a message that says something.
pub fn check_cni_error(e: &CniError) {
    assert!(PARSE_CODES.contains(&e.code), "unexpected code {} for a parse error: {e:?}", e.code);
    check_message(&e.msg);
}

/// An error message: not empty, and not just a word.
pub fn check_message(msg: &str) {
    assert!(msg.trim().len() >= 8, "error message too short to say what was wrong: {msg:?}");
}
