//! The macvlan/ipvlan delegates' configuration: stdin (field 1) with `CNI_ARGS` (field 2)
//! for the kind the first byte picks, through `LinkConf::parse` (everything is checked
//! before the system is touched, so this is the whole of what bad input can reach).
#![no_main]

use cni::CniArgs;
use libfuzzer_sys::fuzz_target;
use cni_link::Kind;
use cni_link::config::LinkConf;
use rust_ipam_fuzz::{check_cni_error, fields, text};

fuzz_target!(|data: &[u8]| {
    let Some((&pick, rest)) = data.split_first() else { return };
    let kind = if pick & 1 == 0 { Kind::Macvlan } else { Kind::Ipvlan };
    let f = fields(rest, 2);
    let args = match CniArgs::parse(&text(f[1])) {
        Ok(a) => a,
        Err(e) => return check_cni_error(&e),
    };
    match LinkConf::parse(kind, f[0], &args) {
        Ok(conf) => assert_eq!(conf.kind.kind(), kind, "the mode of one kind went to the other"),
        Err(e) => check_cni_error(&e),
    }
});
