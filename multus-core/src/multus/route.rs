//! Default routes inside the pod's network namespace, for the `default-route` request of the
//! networks annotation (Multus' `DeleteDefaultGW`/`SetDefaultGW`). Done with iproute2
//! (`nsenter --net=<netns> ip ...`), so CNI_NETNS may be any namespace path.

use std::net::IpAddr;
use std::process::Command;

use cni::{CniError, ErrorCode};
use serde_json::{Value, json};

fn ip_in(netns: &str, args: &[&str]) -> Result<String, CniError> {
    let out =
        Command::new("nsenter").arg(format!("--net={netns}")).arg("ip").args(args).output().map_err(|e| {
            CniError::new(ErrorCode::IO_FAILURE, format!("running nsenter/ip for {netns}: {e}"))
        })?;
    if !out.status.success() {
        return Err(CniError::new(
            ErrorCode::IO_FAILURE,
            format!("ip {} in {netns}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()),
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Removes every default route of one family through `ifname`.
pub fn delete_default(netns: &str, ifname: &str, v6: bool) -> Result<(), CniError> {
    let fam = if v6 { "-6" } else { "-4" };
    let text = ip_in(netns, &[fam, "-j", "route", "show", "default", "dev", ifname])?;
    let routes: Vec<Value> = serde_json::from_str(text.trim()).unwrap_or_default();
    for r in routes {
        let mut args = vec![fam.to_string(), "route".into(), "del".into(), "default".into()];
        if let Some(gw) = r.get("gateway").and_then(Value::as_str) {
            args.extend(["via".into(), gw.into()]);
        }
        args.extend(["dev".into(), ifname.into()]);
        if let Some(m) = r.get("metric").and_then(Value::as_u64) {
            args.extend(["metric".into(), m.to_string()]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        ip_in(netns, &args)?;
    }
    Ok(())
}

/// Adds the default route through `gw` on `ifname`.
pub fn add_default(netns: &str, ifname: &str, gw: IpAddr) -> Result<(), CniError> {
    let fam = if gw.is_ipv6() { "-6" } else { "-4" };
    ip_in(netns, &[fam, "route", "replace", "default", "via", &gw.to_string(), "dev", ifname]).map(|_| ())
}

fn is_default(dst: &str, v6: bool) -> bool {
    if v6 { dst == "::/0" } else { dst == "0.0.0.0/0" }
}

/// The result without its default routes of the families given.
pub fn result_without_default(result: &mut Value, v4: bool, v6: bool) {
    if let Some(routes) = result.get_mut("routes").and_then(Value::as_array_mut) {
        routes.retain(|r| {
            let dst = r.get("dst").and_then(Value::as_str).unwrap_or_default();
            !((v4 && is_default(dst, false)) || (v6 && is_default(dst, true)))
        });
    }
}

/// The result with a default route through `gw`.
pub fn result_with_default(result: &mut Value, gw: IpAddr) {
    let dst = if gw.is_ipv6() { "::/0" } else { "0.0.0.0/0" };
    if !result.get("routes").is_some_and(Value::is_array) {
        result["routes"] = json!([]);
    }
    if let Some(routes) = result["routes"].as_array_mut() {
        routes.push(json!({"dst": dst, "gw": gw.to_string()}));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_lose_and_gain_default_routes() {
        let mut r = json!({"routes": [{"dst": "0.0.0.0/0", "gw": "10.0.0.1"}, {"dst": "::/0"},
            {"dst": "10.9.0.0/16"}]});
        result_without_default(&mut r, true, false);
        assert_eq!(r["routes"], json!([{"dst": "::/0"}, {"dst": "10.9.0.0/16"}]));
        let mut r2 = json!({"ips": []});
        result_with_default(&mut r2, "198.18.7.1".parse().expect("ip"));
        assert_eq!(r2["routes"], json!([{"dst": "0.0.0.0/0", "gw": "198.18.7.1"}]));
    }
}
