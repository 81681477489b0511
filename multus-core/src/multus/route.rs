//! Default routes for the `default-route` request of the networks annotation (Multus'
//! `DeleteDefaultGW`/`SetDefaultGW`): in the pod's network namespace (`cni_link::route`,
//! the link drivers' netlink code) and in the network's typed result.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use cni::{CniResult, ResultRoute};
pub use cni_link::route::{add_default, delete_default};
use ipnetwork::IpNetwork;

/// The result without its default routes of the families given.
pub fn result_without_default(result: &mut CniResult, v4: bool, v6: bool) {
    result.routes.retain(|r| !(r.dst.prefix() == 0 && if r.dst.is_ipv4() { v4 } else { v6 }));
}

/// The result with a default route through `gw`.
pub fn result_with_default(result: &mut CniResult, gw: IpAddr) {
    let any = match gw {
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    };
    // A prefix of 0 is valid in either family: this always matches.
    if let Ok(dst) = IpNetwork::new(any, 0) {
        result.routes.push(ResultRoute::new(dst, Some(gw)));
    }
}

#[cfg(test)]
mod tests {
    use cni::Version;
    use serde_json::json;

    use super::*;

    #[test]
    fn results_lose_and_gain_default_routes() {
        let v = Version::new(1, 0, 0);
        let mut r = CniResult::parse(&json!({"cniVersion": "1.0.0", "routes": [
            {"dst": "0.0.0.0/0", "gw": "10.0.0.1"}, {"dst": "::/0"}, {"dst": "10.9.0.0/16"}]}))
        .expect("result");
        result_without_default(&mut r, true, false);
        assert_eq!(r.render(v)["routes"], json!([{"dst": "::/0"}, {"dst": "10.9.0.0/16"}]));
        result_without_default(&mut r, false, true);
        assert_eq!(r.render(v)["routes"], json!([{"dst": "10.9.0.0/16"}]));
        let mut r2 = CniResult::default();
        result_with_default(&mut r2, "198.18.7.1".parse().expect("ip"));
        result_with_default(&mut r2, "fd00::1".parse().expect("ip"));
        assert_eq!(
            r2.render(v)["routes"],
            json!([{"dst": "0.0.0.0/0", "gw": "198.18.7.1"}, {"dst": "::/0", "gw": "fd00::1"}])
        );
    }
}
