//! The CNI environment: `CNI_COMMAND`, `CNI_CONTAINERID`, `CNI_NETNS`, `CNI_IFNAME`,
//! `CNI_ARGS`, `CNI_PATH` (fields 0-5) and a config's `cniVersion` (field 6), through
//! `Env::from_env`, `CniArgs::parse`, `check_version` and `version_info`.
#![no_main]

use cni::{CniArgs, Env, Version, check_version, version_info};
use libfuzzer_sys::fuzz_target;
use rust_ipam_fuzz::{check_cni_error, fields, text};

const VARS: [&str; 6] = ["CNI_COMMAND", "CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_ARGS", "CNI_PATH"];

fuzz_target!(|data: &[u8]| {
    let f = fields(data, 7);
    let vars: Vec<String> = f[..6].iter().map(|b| text(b)).collect();
    let var = |name: &str| VARS.iter().position(|v| *v == name).map(|i| vars[i].clone());
    match Env::from_env(var) {
        Ok(env) => {
            assert_eq!(env.args, vars[4]);
            match env.cni_args() {
                Ok(args) => {
                    for (k, v) in &args.pairs {
                        assert_eq!(args.get(k), v);
                    }
                }
                Err(e) => check_cni_error(&e),
            }
            let version = text(f[6]);
            match check_version(env.command, &version) {
                Ok(v) => assert_eq!(Version::parse(&version), Some(v)),
                Err(e) => check_cni_error(&e),
            }
            let info = version_info(&version);
            assert!(info.get("supportedVersions").is_some_and(|s| s.is_array()), "{info}");
        }
        Err(e) => check_cni_error(&e),
    }
    if let Err(e) = CniArgs::parse(&vars[4]) {
        check_cni_error(&e);
    }
});
