//! Default routes in a pod's network namespace, for the meta-plugin's `default-route`
//! request (Multus' `DeleteDefaultGW`/`SetDefaultGW`): over the drivers' netlink code, so
//! CNI_NETNS may be any namespace path and no `ip` binary is needed.

use std::fmt::Display;
use std::net::IpAddr;
use std::path::Path;

use cni::{CniError, ErrorCode};

use crate::netlink::{Link, Netlink as _, Nl, NlError, in_netns};

fn io(what: impl Display, netns: &str, e: &NlError) -> CniError {
    CniError::new(ErrorCode::IO_FAILURE, format!("{what} in {netns}: {}", e.text))
}

async fn link(nl: &Nl, netns: &str, ifname: &str) -> Result<Link, CniError> {
    nl.link_by_name(ifname)
        .await
        .map_err(|e| io(format_args!("looking up {ifname}"), netns, &e))?
        .ok_or_else(|| CniError::new(ErrorCode::IO_FAILURE, format!("interface {ifname} is not in {netns}")))
}

fn family(v6: bool) -> &'static str {
    if v6 { "IPv6" } else { "IPv4" }
}

/// Removes every default route of one family through `ifname` in the namespace `netns`.
pub fn delete_default(netns: &str, ifname: &str, v6: bool) -> Result<(), CniError> {
    in_netns(Some(Path::new(netns)), |nl| async move {
        let link = link(&nl, netns, ifname).await?;
        let fam = family(v6);
        let routes = nl
            .default_routes(link.index, v6)
            .await
            .map_err(|e| io(format_args!("listing the {fam} default routes of {ifname}"), netns, &e))?;
        for r in routes {
            nl.delete_route(r)
                .await
                .map_err(|e| io(format_args!("deleting an {fam} default route of {ifname}"), netns, &e))?;
        }
        Ok(())
    })
}

/// Makes `gw` on `ifname` the default route of its family in the namespace `netns`.
pub fn add_default(netns: &str, ifname: &str, gw: IpAddr) -> Result<(), CniError> {
    in_netns(Some(Path::new(netns)), |nl| async move {
        let link = link(&nl, netns, ifname).await?;
        nl.replace_default(link.index, gw)
            .await
            .map_err(|e| io(format_args!("setting the default route via {gw} dev {ifname}"), netns, &e))
    })
}
