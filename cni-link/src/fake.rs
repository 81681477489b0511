//! A stand-in for the kernel's network namespaces, so the drivers' ADD, DEL and CHECK are
//! tested without root. It enforces the rules the drivers rely on: a name is unique in its
//! namespace (`EEXIST`), a master must exist in the namespace the link is made in
//! (`ENODEV`), a link made "into" a namespace lands there with the master as its parent, an
//! MTU above the master's is refused (`EINVAL`), a kind the kernel lacks is `EOPNOTSUPP`,
//! and deleting a link that is gone succeeds. Any one request can be made to fail.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use cni::{CniError, ErrorCode, ResultRoute};
use ipnetwork::IpNetwork;

use super::Kind;
use super::netlink::{EEXIST, ENODEV, EOPNOTSUPP, Link, Namespaces, Netlink, NewLink, NlError, kind_name};

const EINVAL: i32 = 22;

/// A link with what was done to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FakeLink {
    pub(crate) link: Link,
    pub(crate) up: bool,
    pub(crate) addresses: Vec<IpNetwork>,
    /// Destination, table (main unless set) and the gateway the route went via.
    pub(crate) routes: Vec<(IpNetwork, u32, Option<IpAddr>)>,
    pub(crate) announced: bool,
}

impl FakeLink {
    /// The link as a netlink answer shows it: up as it was set.
    fn seen(&self) -> Link {
        Link { up: self.up, ..self.link.clone() }
    }
}

#[derive(Debug, Default)]
struct State {
    /// Each namespace's links; `None` is the plugin's own namespace.
    namespaces: BTreeMap<Option<PathBuf>, Vec<FakeLink>>,
    /// The link of each namespace's default route.
    default_route: BTreeMap<Option<PathBuf>, String>,
    next_index: u32,
    unsupported: Vec<Kind>,
    /// The request that fails, and with which errno.
    fail: Option<(&'static str, i32)>,
}

const RT_TABLE_MAIN: u32 = 254;

fn errno(n: i32) -> NlError {
    NlError { errno: Some(n), text: std::io::Error::from_raw_os_error(n).to_string() }
}

/// The fake namespaces; clones share them.
#[derive(Debug, Clone, Default)]
pub(crate) struct FakeNamespaces {
    state: Arc<Mutex<State>>,
}

impl FakeNamespaces {
    /// Only the plugin's own namespace, empty.
    pub(crate) fn new() -> FakeNamespaces {
        let ns = FakeNamespaces::default();
        ns.lock().namespaces.insert(None, Vec::new());
        ns
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A test that panicked while holding the lock has failed already.
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Adds an empty namespace at `path`.
    pub(crate) fn add_netns(&self, path: &str) {
        self.lock().namespaces.insert(Some(PathBuf::from(path)), Vec::new());
    }

    /// Adds a plain device (a master) to `netns`; returns its index.
    pub(crate) fn add_device(&self, netns: Option<&str>, name: &str, mtu: u32) -> u32 {
        let mut st = self.lock();
        st.next_index += 1;
        let index = st.next_index;
        let link = Link {
            index,
            name: name.to_string(),
            mtu,
            mac: vec![2, 0xaa, 0, 0, 0, u8::try_from(index).unwrap_or(0)],
            kind: String::new(),
            kind_data: None,
            parent: None,
            up: true,
            parent_elsewhere: false,
        };
        let ns = st.namespaces.entry(netns.map(PathBuf::from)).or_default();
        ns.push(FakeLink { link, up: true, addresses: Vec::new(), routes: Vec::new(), announced: false });
        index
    }

    /// Makes `name` the link of the default route of `netns`.
    pub(crate) fn set_default_route(&self, netns: Option<&str>, name: &str) {
        self.lock().default_route.insert(netns.map(PathBuf::from), name.to_string());
    }

    /// The kernel has no `kind` links.
    pub(crate) fn lacks(&self, kind: Kind) {
        self.lock().unsupported.push(kind);
    }

    /// Request `request` (a [`Netlink`] method's name) fails with `errno`.
    pub(crate) fn fail(&self, request: &'static str, errno: i32) {
        self.lock().fail = Some((request, errno));
    }

    /// The links of `netns`.
    pub(crate) fn links(&self, netns: Option<&str>) -> Vec<FakeLink> {
        self.lock().namespaces.get(&netns.map(PathBuf::from)).cloned().unwrap_or_default()
    }

    /// Changes link `name` of `netns`.
    pub(crate) fn edit(&self, netns: Option<&str>, name: &str, f: impl FnOnce(&mut FakeLink)) {
        let mut st = self.lock();
        if let Some(l) = st
            .namespaces
            .get_mut(&netns.map(PathBuf::from))
            .and_then(|ns| ns.iter_mut().find(|l| l.link.name == name))
        {
            f(l);
        }
    }
}

impl Namespaces for FakeNamespaces {
    type Nl = FakeNl;

    fn run<T, F, Fut>(&self, netns: Option<&Path>, f: F) -> Result<T, CniError>
    where
        T: Send,
        F: FnOnce(FakeNl) -> Fut + Send,
        Fut: Future<Output = Result<T, CniError>>,
    {
        let ns = netns.map(Path::to_path_buf);
        if !self.lock().namespaces.contains_key(&ns) {
            return Err(CniError::new(
                ErrorCode::IO_FAILURE,
                format!("entering network namespace {}: ENOENT: No such file or directory", ns_name(&ns)),
            ));
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .map_err(|e| CniError::new(ErrorCode::IO_FAILURE, format!("starting the fake's runtime: {e}")))?;
        rt.block_on(f(FakeNl { ns: self.clone(), at: ns }))
    }

    fn check(&self, path: &Path) -> Result<(), CniError> {
        if self.exists(path) {
            return Ok(());
        }
        Err(CniError::new(
            ErrorCode::INVALID_ENV,
            format!(
                "CNI_NETNS {}: cannot open the network namespace: No such file or directory (os error 2)",
                path.display()
            ),
        ))
    }

    fn exists(&self, path: &Path) -> bool {
        self.lock().namespaces.contains_key(&Some(path.to_path_buf()))
    }

    fn named(&self) -> Vec<PathBuf> {
        self.lock().namespaces.keys().flatten().cloned().collect()
    }
}

fn ns_name(ns: &Option<PathBuf>) -> String {
    ns.as_ref().map_or_else(|| "(own)".to_string(), |p| p.display().to_string())
}

/// A connection inside one fake namespace.
#[derive(Debug)]
pub(crate) struct FakeNl {
    ns: FakeNamespaces,
    at: Option<PathBuf>,
}

impl FakeNl {
    /// Runs `f` on this namespace's links, unless `request` is the one set to fail.
    fn with<T>(
        &self,
        request: &str,
        f: impl FnOnce(&mut State, &Option<PathBuf>) -> Result<T, NlError>,
    ) -> Result<T, NlError> {
        let mut st = self.ns.lock();
        if let Some((r, n)) = st.fail
            && r == request
        {
            return Err(errno(n));
        }
        f(&mut st, &self.at)
    }
}

fn links<'a>(st: &'a mut State, ns: &Option<PathBuf>) -> &'a mut Vec<FakeLink> {
    st.namespaces.entry(ns.clone()).or_default()
}

fn by_index<'a>(st: &'a mut State, ns: &Option<PathBuf>, index: u32) -> Result<&'a mut FakeLink, NlError> {
    links(st, ns).iter_mut().find(|l| l.link.index == index).ok_or_else(|| errno(ENODEV))
}

impl Netlink for FakeNl {
    async fn link_by_name(&self, name: &str) -> Result<Option<Link>, NlError> {
        self.with("link_by_name", |st, ns| {
            Ok(links(st, ns).iter().find(|l| l.link.name == name).map(FakeLink::seen))
        })
    }

    async fn link_by_index(&self, index: u32) -> Result<Option<Link>, NlError> {
        self.with("link_by_index", |st, ns| {
            Ok(links(st, ns).iter().find(|l| l.link.index == index).map(FakeLink::seen))
        })
    }

    async fn links(&self) -> Result<Vec<Link>, NlError> {
        self.with("links", |st, ns| Ok(links(st, ns).iter().map(FakeLink::seen).collect()))
    }

    async fn default_route_link(&self) -> Result<Option<String>, NlError> {
        self.with("default_route_link", |st, ns| Ok(st.default_route.get(ns).cloned()))
    }

    async fn create(&self, new: &NewLink<'_>) -> Result<(), NlError> {
        self.with("create", |st, ns| {
            let kind = new.kind.kind();
            if st.unsupported.contains(&kind) {
                return Err(errno(EOPNOTSUPP));
            }
            let master = links(st, ns)
                .iter()
                .find(|l| l.link.index == new.master)
                .map(|l| l.link.clone())
                .ok_or_else(|| errno(ENODEV))?;
            if new.mtu > master.mtu {
                return Err(errno(EINVAL));
            }
            let target = match new.into {
                Some(p) => Some(p.to_path_buf()),
                None => ns.clone(),
            };
            if !st.namespaces.contains_key(&target) {
                return Err(errno(EINVAL));
            }
            if links(st, &target).iter().any(|l| l.link.name == new.name) {
                return Err(errno(EEXIST));
            }
            st.next_index += 1;
            let index = st.next_index;
            let mac = match (kind, new.mac) {
                // ipvlan links share the master's address.
                (Kind::Ipvlan, _) => master.mac.clone(),
                (Kind::Macvlan, Some(m)) => m.to_vec(),
                (Kind::Macvlan, None) => vec![2, 0xbb, 0, 0, 0, u8::try_from(index).unwrap_or(0)],
            };
            let link = Link {
                index,
                name: new.name.to_string(),
                mtu: if new.mtu == 0 { master.mtu } else { new.mtu },
                mac,
                kind: kind_name(kind),
                kind_data: Some(new.kind),
                parent: Some(master.index),
                up: false,
                parent_elsewhere: target != *ns,
            };
            let fake =
                FakeLink { link, up: false, addresses: Vec::new(), routes: Vec::new(), announced: false };
            links(st, &target).push(fake);
            Ok(())
        })
    }

    async fn rename(&self, index: u32, name: &str) -> Result<(), NlError> {
        self.with("rename", |st, ns| {
            if links(st, ns).iter().any(|l| l.link.name == name && l.link.index != index) {
                return Err(errno(EEXIST));
            }
            by_index(st, ns, index)?.link.name = name.to_string();
            Ok(())
        })
    }

    async fn set_up(&self, index: u32) -> Result<(), NlError> {
        self.with("set_up", |st, ns| {
            by_index(st, ns, index)?.up = true;
            Ok(())
        })
    }

    async fn delete(&self, index: u32) -> Result<(), NlError> {
        self.with("delete", |st, ns| {
            links(st, ns).retain(|l| l.link.index != index);
            Ok(())
        })
    }

    async fn add_address(&self, index: u32, addr: IpNetwork) -> Result<(), NlError> {
        self.with("add_address", |st, ns| {
            let l = by_index(st, ns, index)?;
            if l.addresses.contains(&addr) {
                return Err(errno(EEXIST));
            }
            l.addresses.push(addr);
            Ok(())
        })
    }

    async fn addresses(&self, index: u32) -> Result<Vec<IpNetwork>, NlError> {
        self.with("addresses", |st, ns| Ok(by_index(st, ns, index)?.addresses.clone()))
    }

    async fn add_route(&self, index: u32, route: &ResultRoute, gw: Option<IpAddr>) -> Result<(), NlError> {
        self.with("add_route", |st, ns| {
            let l = by_index(st, ns, index)?;
            let r = (route.dst, route.table.unwrap_or(RT_TABLE_MAIN), gw);
            if l.routes.iter().any(|(d, t, _)| (*d, *t) == (r.0, r.1)) {
                return Err(errno(EEXIST));
            }
            l.routes.push(r);
            Ok(())
        })
    }

    async fn has_route(&self, index: u32, route: &ResultRoute) -> Result<bool, NlError> {
        self.with("has_route", |st, ns| {
            let table = route.table.unwrap_or(RT_TABLE_MAIN);
            Ok(by_index(st, ns, index)?
                .routes
                .iter()
                .any(|(d, t, g)| *d == route.dst && *t == table && (route.gw.is_none() || *g == route.gw)))
        })
    }

    fn announce(&self, ifname: &str, _ipv6: bool) {
        let mut st = self.ns.lock();
        if let Some(l) = links(&mut st, &self.at).iter_mut().find(|l| l.link.name == ifname) {
            l.announced = true;
        }
    }
}
