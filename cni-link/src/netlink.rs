//! Netlink inside one network namespace, on a thread of its own, behind the two traits the
//! drivers use ([`Namespaces`], [`Netlink`]) so that their logic runs against a fake too.
//!
//! A netlink socket talks to the namespace of the thread that opened it, and `setns` moves
//! only the calling thread. So every namespace gets a fresh OS thread that enters it
//! (`nix::sched::setns`, a safe call: no `unsafe` here), opens its socket there, runs its
//! requests on a current-thread runtime and ends: no thread ever goes back to a pool in
//! another namespace, and no async worker shared with other work ever switches.

use std::fs::File;
use std::future::Future;
use std::net::IpAddr;
use std::os::fd::AsRawFd as _;
use std::path::{Path, PathBuf};

use cni::{CniError, ErrorCode, ResultRoute};
use futures::TryStreamExt as _;
use ipnetwork::IpNetwork;
use nix::sched::CloneFlags;
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::packet_route::address::{AddressAttribute, AddressFlags, AddressMessage};
use rtnetlink::packet_route::link::{
    InfoData, InfoIpVlan, InfoKind, InfoMacVlan, IpVlanMode, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
    MacVlanMode,
};
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteMessage, RouteMetric, RouteProtocol, RouteScope,
};
use rtnetlink::{Handle, LinkIpVlan, LinkMacVlan, LinkUnspec, RouteMessageBuilder};
use std::net::{Ipv4Addr, Ipv6Addr};

use super::Kind;
use super::config::{IpvlanMode, KindData, MacvlanMode};

pub(crate) const ENODEV: i32 = 19;
pub(crate) const EOPNOTSUPP: i32 = 95;
pub(crate) const EEXIST: i32 = 17;
const RT_TABLE_MAIN: u32 = 254;

/// A netlink failure: the kernel's errno when it answered one, and a readable text.
#[derive(Debug, Clone)]
pub(crate) struct NlError {
    pub(crate) errno: Option<i32>,
    pub(crate) text: String,
}

impl From<rtnetlink::Error> for NlError {
    fn from(e: rtnetlink::Error) -> NlError {
        match e {
            rtnetlink::Error::NetlinkError(m) => {
                NlError { errno: m.code.map(|c| c.get().abs()), text: m.to_io().to_string() }
            }
            other => NlError { errno: None, text: other.to_string() },
        }
    }
}

/// Error 120 for a failed request: `what` says which.
pub(crate) fn failed(what: impl std::fmt::Display, e: &NlError) -> CniError {
    CniError::new(ErrorCode::NETLINK_FAILED, format!("{what}: {}", e.text))
}

/// What the plugin needs to know of a link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Link {
    pub(crate) index: u32,
    pub(crate) name: String,
    pub(crate) mtu: u32,
    pub(crate) mac: Vec<u8>,
    /// `IFLA_INFO_KIND` (`macvlan`, `veth`, ...); empty for a plain device.
    pub(crate) kind: String,
    /// The macvlan/ipvlan kind and mode, when it is one.
    pub(crate) kind_data: Option<KindData>,
    /// `IFLA_LINK`: the parent's index (in the parent's namespace).
    pub(crate) parent: Option<u32>,
    /// Administratively up (`IFF_UP`).
    pub(crate) up: bool,
    /// The parent is in another namespace (`IFLA_LINK_NETNSID` is set): a link made on a
    /// node's master and moved into a pod.
    pub(crate) parent_elsewhere: bool,
}

impl Link {
    fn from_message(m: &LinkMessage) -> Link {
        let mut link = Link {
            index: m.header.index,
            name: String::new(),
            mtu: 0,
            mac: Vec::new(),
            kind: String::new(),
            kind_data: None,
            parent: None,
            up: m.header.flags.contains(LinkFlags::Up),
            parent_elsewhere: false,
        };
        for a in &m.attributes {
            match a {
                LinkAttribute::IfName(n) => link.name = n.clone(),
                LinkAttribute::Mtu(n) => link.mtu = *n,
                LinkAttribute::Address(a) => link.mac = a.clone(),
                LinkAttribute::Link(p) => link.parent = Some(*p),
                LinkAttribute::LinkNetNsId(_) => link.parent_elsewhere = true,
                LinkAttribute::LinkInfo(infos) => {
                    for i in infos {
                        match i {
                            LinkInfo::Kind(k) => link.kind = k.to_string(),
                            LinkInfo::Data(InfoData::MacVlan(d)) => {
                                link.kind_data = d.iter().find_map(|x| match x {
                                    InfoMacVlan::Mode(m) => macvlan_mode(*m),
                                    _ => None,
                                })
                            }
                            LinkInfo::Data(InfoData::IpVlan(d)) => {
                                link.kind_data = d.iter().find_map(|x| match x {
                                    InfoIpVlan::Mode(m) => ipvlan_mode(*m),
                                    _ => None,
                                })
                            }
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        link
    }

    /// The MAC address as results print it.
    pub(crate) fn mac_string(&self) -> String {
        self.mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
    }
}

fn macvlan_mode(m: MacVlanMode) -> Option<KindData> {
    Some(KindData::Macvlan(match m {
        MacVlanMode::Bridge => MacvlanMode::Bridge,
        MacVlanMode::Private => MacvlanMode::Private,
        MacVlanMode::Vepa => MacvlanMode::Vepa,
        MacVlanMode::Passthrough => MacvlanMode::Passthru,
        _ => return None,
    }))
}

fn ipvlan_mode(m: IpVlanMode) -> Option<KindData> {
    Some(KindData::Ipvlan(match m {
        IpVlanMode::L2 => IpvlanMode::L2,
        IpVlanMode::L3 => IpvlanMode::L3,
        IpVlanMode::L3S => IpvlanMode::L3s,
        _ => return None,
    }))
}

/// How to create a link.
#[derive(Debug, Clone)]
pub(crate) struct NewLink<'a> {
    pub(crate) name: &'a str,
    pub(crate) master: u32,
    pub(crate) kind: KindData,
    pub(crate) mtu: u32,
    pub(crate) mac: Option<[u8; 6]>,
    /// Create it straight into the namespace at this path instead of the master's.
    pub(crate) into: Option<&'a Path>,
}

/// Where the drivers' netlink requests go: one network namespace at a time.
pub(crate) trait Namespaces: Sync {
    /// A connection inside one namespace.
    type Nl: Netlink;

    /// Runs `f` with a connection in the namespace at `netns` (`None`: the plugin's own).
    fn run<T, F, Fut>(&self, netns: Option<&Path>, f: F) -> Result<T, CniError>
    where
        T: Send,
        F: FnOnce(Self::Nl) -> Fut + Send,
        Fut: Future<Output = Result<T, CniError>>;

    /// Error 4 unless `path` (`CNI_NETNS`) is a network namespace that can be opened.
    fn check(&self, path: &Path) -> Result<(), CniError>;

    /// True when something is at `path` (a DEL's namespace may be gone).
    fn exists(&self, path: &Path) -> bool;
    /// The namespaces pinned by name on the node (`ip netns`, where containerd and CRI-O
    /// keep their pods'), to look for the other links of a master.
    fn named(&self) -> Vec<PathBuf>;
}

/// The requests the drivers make in one namespace. Errors are the kernel's; the drivers
/// say which request failed.
pub(crate) trait Netlink {
    /// The link named `name`, if there is one.
    async fn link_by_name(&self, name: &str) -> Result<Option<Link>, NlError>;
    /// The link with index `index`, if there is one.
    async fn link_by_index(&self, index: u32) -> Result<Option<Link>, NlError>;
    /// Every link of the namespace.
    async fn links(&self) -> Result<Vec<Link>, NlError>;
    /// The name of the link of the first default route (IPv4, then IPv6) of the main table.
    async fn default_route_link(&self) -> Result<Option<String>, NlError>;
    /// Creates a macvlan or ipvlan link; `EOPNOTSUPP` when the kernel lacks the kind.
    async fn create(&self, new: &NewLink<'_>) -> Result<(), NlError>;
    /// Renames link `index`; `EEXIST` when the name is taken.
    async fn rename(&self, index: u32, name: &str) -> Result<(), NlError>;
    /// Sets link `index` up.
    async fn set_up(&self, index: u32) -> Result<(), NlError>;
    /// Deletes link `index`; a link that is already gone is success.
    async fn delete(&self, index: u32) -> Result<(), NlError>;
    /// Adds `addr` to link `index` (IPv6 without duplicate address detection).
    async fn add_address(&self, index: u32, addr: IpNetwork) -> Result<(), NlError>;
    /// The addresses on link `index`.
    async fn addresses(&self, index: u32) -> Result<Vec<IpNetwork>, NlError>;
    /// Adds `route` through link `index`, via `gw`.
    async fn add_route(&self, index: u32, route: &ResultRoute, gw: Option<IpAddr>) -> Result<(), NlError>;
    /// True when a route to `route.dst` through link `index` exists (in its table, default
    /// main, via its `gw` if it has one).
    async fn has_route(&self, index: u32, route: &ResultRoute) -> Result<bool, NlError>;
    /// Makes the link announce its addresses on up and on change (`arp_notify`,
    /// `ndisc_notify`) and, for IPv6 addresses, enables IPv6 on it; best effort, as a
    /// namespace may have IPv6 disabled.
    fn announce(&self, ifname: &str, ipv6: bool);
}

/// The kernel's network namespaces.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Kernel;

impl Namespaces for Kernel {
    type Nl = Nl;

    fn run<T, F, Fut>(&self, netns: Option<&Path>, f: F) -> Result<T, CniError>
    where
        T: Send,
        F: FnOnce(Nl) -> Fut + Send,
        Fut: Future<Output = Result<T, CniError>>,
    {
        in_netns(netns, f)
    }

    fn check(&self, path: &Path) -> Result<(), CniError> {
        open_netns(path).map(drop)
    }

    fn exists(&self, path: &Path) -> bool {
        path.exists()
    }

    fn named(&self) -> Vec<PathBuf> {
        // /var/run is /run on current systems; a path seen through both is listed once.
        let mut seen = std::collections::BTreeSet::new();
        ["/run/netns", "/var/run/netns"]
            .iter()
            .flat_map(|d| std::fs::read_dir(d).into_iter().flatten().flatten())
            .map(|e| e.path())
            .filter(|p| seen.insert(std::fs::canonicalize(p).unwrap_or_else(|_| p.clone())))
            .collect()
    }
}

/// A netlink connection in one namespace.
#[derive(Debug, Clone)]
pub(crate) struct Nl {
    handle: Handle,
}

/// Runs `f` with a netlink connection in the namespace at `netns` (`None`: the plugin's own
/// namespace), on a new OS thread that ends with it.
pub(crate) fn in_netns<T, F, Fut>(netns: Option<&Path>, f: F) -> Result<T, CniError>
where
    T: Send,
    F: FnOnce(Nl) -> Fut + Send,
    Fut: Future<Output = Result<T, CniError>>,
{
    std::thread::scope(|s| {
        let thread = s.spawn(move || {
            if let Some(path) = netns {
                let file = open_netns(path)?;
                nix::sched::setns(&file, CloneFlags::CLONE_NEWNET).map_err(|e| {
                    CniError::new(
                        ErrorCode::IO_FAILURE,
                        format!("entering network namespace {}: {e}", path.display()),
                    )
                })?;
            }
            let rt = tokio::runtime::Builder::new_current_thread().enable_io().build().map_err(|e| {
                CniError::new(ErrorCode::IO_FAILURE, format!("starting the netlink runtime: {e}"))
            })?;
            rt.block_on(async {
                let (conn, handle, _) = rtnetlink::new_connection().map_err(|e| {
                    CniError::new(ErrorCode::IO_FAILURE, format!("opening a netlink socket: {e}"))
                })?;
                let conn = tokio::spawn(conn);
                let out = f(Nl { handle }).await;
                conn.abort();
                out
            })
        });
        thread
            .join()
            .unwrap_or_else(|_| Err(CniError::new(ErrorCode::IO_FAILURE, "the netlink thread panicked")))
    })
}

/// Opens a network namespace file (`CNI_NETNS`); error 4 when it cannot.
pub(crate) fn open_netns(path: &Path) -> Result<File, CniError> {
    File::open(path).map_err(|e| {
        CniError::new(
            ErrorCode::INVALID_ENV,
            format!("CNI_NETNS {}: cannot open the network namespace: {e}", path.display()),
        )
    })
}

fn ipnet_of(addr: IpAddr, prefix: u8) -> Option<IpNetwork> {
    IpNetwork::new(addr, prefix).ok()
}

impl Nl {
    /// The default routes of one family through link `index`, in the main table (what
    /// `ip route show default dev <link>` lists).
    pub(crate) async fn default_routes(&self, index: u32, v6: bool) -> Result<Vec<RouteMessage>, NlError> {
        let mut query = RouteMessageBuilder::<IpAddr>::new().build();
        query.header.address_family = if v6 { AddressFamily::Inet6 } else { AddressFamily::Inet };
        let routes: Vec<RouteMessage> = self.handle.route().get(query).execute().try_collect().await?;
        Ok(routes
            .into_iter()
            .filter(|r| {
                r.header.destination_prefix_length == 0
                    && table_of(r) == RT_TABLE_MAIN
                    && r.attributes.iter().any(|a| matches!(a, RouteAttribute::Oif(i) if *i == index))
            })
            .collect())
    }

    /// Deletes a route as listed by [`Nl::default_routes`].
    pub(crate) async fn delete_route(&self, route: RouteMessage) -> Result<(), NlError> {
        Ok(self.handle.route().del(route).execute().await?)
    }

    /// Makes `gw` on link `index` the default route of its family, replacing one that is
    /// there (`ip route replace default via <gw> dev <link>`).
    pub(crate) async fn replace_default(&self, index: u32, gw: IpAddr) -> Result<(), NlError> {
        let msg = match gw {
            IpAddr::V4(g) => RouteMessageBuilder::<Ipv4Addr>::new()
                .gateway(g)
                .output_interface(index)
                .protocol(RouteProtocol::Boot)
                .build(),
            IpAddr::V6(g) => RouteMessageBuilder::<Ipv6Addr>::new()
                .gateway(g)
                .output_interface(index)
                .protocol(RouteProtocol::Boot)
                .build(),
        };
        Ok(self.handle.route().add(msg).replace().execute().await?)
    }
}

impl Netlink for Nl {
    /// The link named `name`, if there is one.
    async fn link_by_name(&self, name: &str) -> Result<Option<Link>, NlError> {
        let mut stream = self.handle.link().get().match_name(name.to_string()).execute();
        match stream.try_next().await {
            Ok(Some(m)) => Ok(Some(Link::from_message(&m))),
            Ok(None) => Ok(None),
            Err(e) => {
                let e = NlError::from(e);
                if e.errno == Some(ENODEV) { Ok(None) } else { Err(e) }
            }
        }
    }

    /// The link with index `index`, if there is one.
    async fn link_by_index(&self, index: u32) -> Result<Option<Link>, NlError> {
        let mut stream = self.handle.link().get().match_index(index).execute();
        match stream.try_next().await {
            Ok(m) => Ok(m.as_ref().map(Link::from_message)),
            Err(e) => {
                let e = NlError::from(e);
                if e.errno == Some(ENODEV) { Ok(None) } else { Err(e) }
            }
        }
    }

    async fn links(&self) -> Result<Vec<Link>, NlError> {
        let msgs: Vec<LinkMessage> = self.handle.link().get().execute().try_collect().await?;
        Ok(msgs.iter().map(Link::from_message).collect())
    }

    /// The name of the link of the first default route (IPv4, then IPv6), as the
    /// reference plugins pick a master when none is configured.
    async fn default_route_link(&self) -> Result<Option<String>, NlError> {
        for family in [AddressFamily::Inet, AddressFamily::Inet6] {
            let mut query = RouteMessageBuilder::<IpAddr>::new().build();
            query.header.address_family = family;
            let routes: Vec<RouteMessage> = self.handle.route().get(query).execute().try_collect().await?;
            for r in routes {
                if r.header.destination_prefix_length != 0 || table_of(&r) != RT_TABLE_MAIN {
                    continue;
                }
                let oif = r.attributes.iter().find_map(|a| match a {
                    RouteAttribute::Oif(i) => Some(*i),
                    _ => None,
                });
                if let Some(i) = oif
                    && let Some(l) = self.link_by_index(i).await?
                {
                    return Ok(Some(l.name));
                }
            }
        }
        Ok(None)
    }

    async fn create(&self, new: &NewLink<'_>) -> Result<(), NlError> {
        let mut msg = match new.kind {
            KindData::Macvlan(m) => {
                let mode = match m {
                    MacvlanMode::Bridge => MacVlanMode::Bridge,
                    MacvlanMode::Private => MacVlanMode::Private,
                    MacvlanMode::Vepa => MacVlanMode::Vepa,
                    MacvlanMode::Passthru => MacVlanMode::Passthrough,
                };
                LinkMacVlan::new(new.name, new.master, mode).build()
            }
            KindData::Ipvlan(m) => {
                let mode = match m {
                    IpvlanMode::L2 => IpVlanMode::L2,
                    IpvlanMode::L3 => IpVlanMode::L3,
                    IpvlanMode::L3s => IpVlanMode::L3S,
                };
                LinkIpVlan::new(new.name, new.master, mode).build()
            }
        };
        if new.mtu > 0 {
            msg.attributes.push(LinkAttribute::Mtu(new.mtu));
        }
        if let Some(mac) = new.mac {
            msg.attributes.push(LinkAttribute::Address(mac.to_vec()));
        }
        // Held open until the kernel has moved the link there.
        let target = match new.into {
            Some(path) => Some(File::open(path).map_err(|e| NlError {
                errno: e.raw_os_error(),
                text: format!("opening {}: {e}", path.display()),
            })?),
            None => None,
        };
        if let Some(f) = &target {
            msg.attributes.push(LinkAttribute::NetNsFd(f.as_raw_fd()));
        }
        Ok(self.handle.link().add(msg).execute().await?)
    }

    async fn rename(&self, index: u32, name: &str) -> Result<(), NlError> {
        let msg = LinkUnspec::new_with_index(index).name(name.to_string()).build();
        Ok(self.handle.link().set(msg).execute().await?)
    }

    async fn set_up(&self, index: u32) -> Result<(), NlError> {
        let msg = LinkUnspec::new_with_index(index).up().build();
        Ok(self.handle.link().set(msg).execute().await?)
    }

    /// Deletes link `index`.
    async fn delete(&self, index: u32) -> Result<(), NlError> {
        match self.handle.link().del(index).execute().await.map_err(NlError::from) {
            Err(e) if e.errno == Some(ENODEV) => Ok(()),
            other => other,
        }
    }

    // IPv6 addresses skip duplicate address detection: the IPAM guarantees uniqueness, and
    // DAD would leave them unusable for a second or more.
    async fn add_address(&self, index: u32, addr: IpNetwork) -> Result<(), NlError> {
        let mut req = self.handle.address().add(index, addr.ip(), addr.prefix());
        if addr.is_ipv6() {
            req.message_mut().attributes.push(AddressAttribute::Flags(AddressFlags::Nodad));
        }
        Ok(req.execute().await?)
    }

    /// The addresses on link `index`.
    async fn addresses(&self, index: u32) -> Result<Vec<IpNetwork>, NlError> {
        let msgs: Vec<AddressMessage> =
            self.handle.address().get().set_link_index_filter(index).execute().try_collect().await?;
        Ok(msgs
            .iter()
            .filter(|m| m.header.index == index)
            .filter_map(|m| {
                let local = m.attributes.iter().find_map(|a| match a {
                    AddressAttribute::Local(ip) => Some(*ip),
                    _ => None,
                });
                let addr = local.or_else(|| {
                    m.attributes.iter().find_map(|a| match a {
                        AddressAttribute::Address(ip) => Some(*ip),
                        _ => None,
                    })
                })?;
                ipnet_of(addr, m.header.prefix_len)
            })
            .collect())
    }

    async fn add_route(&self, index: u32, route: &ResultRoute, gw: Option<IpAddr>) -> Result<(), NlError> {
        // The drivers check the families first, so the builder has nothing left to refuse.
        fn invalid(e: impl std::fmt::Display) -> NlError {
            NlError { errno: None, text: e.to_string() }
        }
        let mut b = RouteMessageBuilder::<IpAddr>::new()
            .destination_prefix(route.dst.network(), route.dst.prefix())
            .map_err(invalid)?
            .output_interface(index)
            // As the reference plugins (`proto boot`, what `ip route add` makes).
            .protocol(RouteProtocol::Boot);
        if let Some(g) = gw {
            b = b.gateway(g).map_err(invalid)?;
        }
        if let Some(p) = route.priority {
            b = b.priority(p);
        }
        if let Some(t) = route.table {
            b = b.table_id(t);
        }
        if let Some(s) = route.scope {
            b = b.scope(RouteScope::from(u8::try_from(s).unwrap_or(0)));
        } else if gw.is_none() {
            // A route without a gateway is on the link.
            b = b.scope(RouteScope::Link);
        }
        let mut msg = b.build();
        let mut metrics = Vec::new();
        if let Some(m) = route.mtu {
            metrics.push(RouteMetric::Mtu(m));
        }
        if let Some(m) = route.advmss {
            metrics.push(RouteMetric::Advmss(m));
        }
        if !metrics.is_empty() {
            msg.attributes.push(RouteAttribute::Metrics(metrics));
        }
        Ok(self.handle.route().add(msg).execute().await?)
    }

    /// True when a route to `dst` through link `index` exists (in `table`, default main).
    async fn has_route(&self, index: u32, route: &ResultRoute) -> Result<bool, NlError> {
        let mut query = RouteMessageBuilder::<IpAddr>::new().build();
        query.header.address_family =
            if route.dst.is_ipv4() { AddressFamily::Inet } else { AddressFamily::Inet6 };
        let routes: Vec<RouteMessage> = self.handle.route().get(query).execute().try_collect().await?;
        let want_table = route.table.unwrap_or(RT_TABLE_MAIN);
        Ok(routes.iter().any(|r| {
            let mut dst = None;
            let mut oif = None;
            let mut gw = None;
            for a in &r.attributes {
                match a {
                    RouteAttribute::Destination(d) => dst = route_ip(d),
                    RouteAttribute::Oif(i) => oif = Some(*i),
                    RouteAttribute::Gateway(g) => gw = route_ip(g),
                    _ => {}
                }
            }
            let dst = dst.unwrap_or(if route.dst.is_ipv4() {
                IpAddr::from([0u8; 4])
            } else {
                IpAddr::from([0u16; 8])
            });
            r.header.destination_prefix_length == route.dst.prefix()
                && dst == route.dst.network()
                && oif == Some(index)
                && table_of(r) == want_table
                && (route.gw.is_none() || gw == route.gw)
        }))
    }

    fn announce(&self, ifname: &str, ipv6: bool) {
        // /proc/sys/net is the namespace of this thread, which is the link's.
        let _ = std::fs::write(format!("/proc/sys/net/ipv4/conf/{ifname}/arp_notify"), "1");
        let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{ifname}/ndisc_notify"), "1");
        if ipv6 {
            let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{ifname}/disable_ipv6"), "0");
        }
    }
}

fn route_ip(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}

fn table_of(r: &RouteMessage) -> u32 {
    r.attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(r.header.table))
}

/// The `kind` string the kernel reports for a link of `kind`.
pub(crate) fn kind_name(kind: Kind) -> String {
    match kind {
        Kind::Macvlan => InfoKind::MacVlan.to_string(),
        Kind::Ipvlan => InfoKind::IpVlan.to_string(),
    }
}
