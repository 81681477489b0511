//! Ranges as a NAD's ipam config writes them, parsed into what the allocator needs.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnetwork::IpNetwork;
use serde::{Deserialize, Serialize};

use super::{AllocError, Str, empty_str};

/// A range exactly as configured (Whereabouts' keys). Stored as given, parsed on load.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RangeInput {
    /// CIDR or `first-last/prefix`.
    pub range: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub range_start: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub range_end: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exclude: Vec<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub gateway: String,
}

/// The address family of a range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    /// The family of `ip`.
    pub fn of(ip: IpAddr) -> Family {
        match ip {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        })
    }
}

/// An address as an integer (IPv4 in the low 32 bits).
pub fn ip_to_u128(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(a) => u128::from(u32::from(a)),
        IpAddr::V6(a) => u128::from(a),
    }
}

/// An address from its integer (see [`ip_to_u128`]).
pub fn u128_to_ip(family: Family, v: u128) -> IpAddr {
    match family {
        Family::V4 => IpAddr::V4(Ipv4Addr::from(v as u32)),
        Family::V6 => IpAddr::V6(Ipv6Addr::from(v)),
    }
}

/// A validated range: the addresses `first..=last` that may be handed out, less exclusions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RangeSpec {
    input: RangeInput,
    network: IpNetwork,
    family: Family,
    first: u128,
    last: u128,
    /// Excluded offsets from `first`, sorted, merged, clipped to the range (gateway included).
    excluded: Vec<(u128, u128)>,
    excluded_count: u128,
    gateway: Option<IpAddr>,
    /// Cached [`RangeSpec::key`] and [`RangeSpec::display`]: the allocator looks them up on
    /// every request.
    key: Str,
    display: Str,
}

/// Names fields in error messages: `range_start` for a single range, `ranges[1].range_start`
/// when the request has several.
#[derive(Debug, Clone, Copy)]
pub struct FieldPrefix<'a>(pub &'a str);

impl FieldPrefix<'_> {
    fn field(&self, name: &str) -> String {
        format!("{}{name}", self.0)
    }
}

fn invalid(field: String, value: &str, reason: impl Into<String>) -> AllocError {
    AllocError::Invalid { field, value: value.to_string(), reason: reason.into() }
}

/// Parses a bare address or an address with a prefix (the prefix is dropped).
/// The first and last address `network` hands out by default: all but its network and
/// last address, except in a /31 or /32 (/127, /128), where every address is a host's
/// (RFC 3021 point-to-point links).
fn host_bounds(network: &IpNetwork) -> (u128, u128) {
    let (first, last) = (ip_to_u128(network.network()), ip_to_u128(network.broadcast()));
    match last - first < 2 {
        true => (first, last),
        false => (first + 1, last - 1),
    }
}

pub fn parse_address(field: &str, value: &str) -> Result<IpAddr, AllocError> {
    let v = value.trim();
    let parsed = match v.split_once('/') {
        Some(_) => v.parse::<IpNetwork>().ok().map(|n| n.ip()),
        None => v.parse::<IpAddr>().ok(),
    };
    parsed.ok_or_else(|| invalid(field.to_string(), value, "is not an IP address"))
}

impl RangeSpec {
    /// Validates a configured range. `prefix` names the fields in errors.
    pub fn parse(input: &RangeInput, prefix: FieldPrefix<'_>) -> Result<RangeSpec, AllocError> {
        let range_field = prefix.field("range");
        let raw = input.range.trim();
        if raw.is_empty() {
            return Err(invalid(range_field, raw, "is empty: a CIDR or first-last/prefix is required"));
        }
        let (network, dash_bounds) = parse_range(raw)
            .ok_or_else(|| invalid(range_field.clone(), raw, "is not a CIDR or first-last/prefix range"))?;
        let family = Family::of(network.ip());
        let (lo, hi) = host_bounds(&network);
        let mut first = lo;
        let mut last = hi;
        let in_network = |field: String, ip: IpAddr, value: &str| -> Result<u128, AllocError> {
            if Family::of(ip) != family {
                return Err(invalid(
                    field,
                    value,
                    format!("is not an {family} address (range {network} is {family})"),
                ));
            }
            if !network.contains(ip) {
                return Err(invalid(field, value, format!("is outside range {network}")));
            }
            Ok(ip_to_u128(ip))
        };
        if let Some((a, b)) = dash_bounds {
            first = first.max(in_network(range_field.clone(), a, raw)?);
            last = last.min(in_network(range_field.clone(), b, raw)?);
        }
        if !input.range_start.trim().is_empty() {
            let f = prefix.field("range_start");
            let ip = parse_address(&f, &input.range_start)?;
            first = lo.max(in_network(f, ip, &input.range_start)?);
        }
        if !input.range_end.trim().is_empty() {
            let f = prefix.field("range_end");
            let ip = parse_address(&f, &input.range_end)?;
            last = hi.min(in_network(f, ip, &input.range_end)?);
        }
        if first > last {
            return Err(invalid(
                prefix.field("range_start"),
                &u128_to_ip(family, first).to_string(),
                format!("is after range_end {}", u128_to_ip(family, last)),
            ));
        }

        let mut intervals = Vec::new();
        for (i, ex) in input.exclude.iter().enumerate() {
            let f = prefix.field(&format!("exclude[{i}]"));
            let (lo, hi) = parse_exclusion(ex.trim())
                .ok_or_else(|| invalid(f.clone(), ex, "is not an IP address or CIDR"))?;
            if Family::of(lo) != family {
                return Err(invalid(
                    f,
                    ex,
                    format!("is not an {family} address (range {network} is {family})"),
                ));
            }
            push_clipped(&mut intervals, ip_to_u128(lo), ip_to_u128(hi), first, last);
        }
        let gateway = if input.gateway.trim().is_empty() {
            None
        } else {
            let f = prefix.field("gateway");
            let gw = parse_address(&f, &input.gateway)?;
            if Family::of(gw) != family {
                return Err(invalid(
                    f,
                    &input.gateway,
                    format!("is not an {family} address (range {network} is {family})"),
                ));
            }
            let v = ip_to_u128(gw);
            push_clipped(&mut intervals, v, v, first, last);
            Some(gw)
        };
        let excluded = merge(intervals);
        let excluded_count: u128 = excluded.iter().map(|(a, b)| b - a + 1).sum();
        let size = last - first + 1;
        if excluded_count >= size {
            return Err(invalid(
                prefix.field("exclude"),
                &input.exclude.join(","),
                format!("leaves no usable address in range {raw} ({size} addresses, all excluded)"),
            ));
        }
        let mut spec = RangeSpec {
            input: input.clone(),
            network,
            family,
            first,
            last,
            excluded,
            excluded_count,
            gateway,
            key: empty_str(),
            display: empty_str(),
        };
        spec.display = spec.render_display().into();
        spec.key = spec.render_key().into();
        Ok(spec)
    }

    /// Refuses a gateway outside the range's network and an exclusion that shares no
    /// address with it (parsing takes both, as Whereabouts does; a pool is checked more
    /// strictly).
    pub fn check_contained(&self, prefix: FieldPrefix<'_>) -> Result<(), AllocError> {
        if let Some(gw) = self.gateway
            && !self.network.contains(gw)
        {
            let field = prefix.field("gateway");
            return Err(invalid(field, &self.input.gateway, format!("is outside range {}", self.network)));
        }
        let (lo, hi) = (ip_to_u128(self.network.network()), ip_to_u128(self.network.broadcast()));
        for (i, ex) in self.input.exclude.iter().enumerate() {
            if let Some((a, b)) = parse_exclusion(ex.trim())
                && (ip_to_u128(b) < lo || ip_to_u128(a) > hi)
            {
                let field = prefix.field(&format!("exclude[{i}]"));
                return Err(invalid(field, ex, format!("is outside range {}", self.network)));
            }
        }
        Ok(())
    }

    /// The range as configured.
    pub fn input(&self) -> &RangeInput {
        &self.input
    }

    /// Identity of the pool: every setting that changes which addresses it hands out.
    pub fn key(&self) -> &str {
        &self.key
    }

    pub(super) fn key_str(&self) -> &Str {
        &self.key
    }

    /// Short form recorded on leases: the CIDR, or `first-last/prefix` when narrowed.
    pub fn display(&self) -> &str {
        &self.display
    }

    pub(super) fn display_str(&self) -> &Str {
        &self.display
    }

    fn render_key(&self) -> String {
        let mut k = self.display.to_string();
        for (a, b) in &self.excluded {
            k.push_str(&format!(" -{}", self.addr(*a)));
            if a != b {
                k.push_str(&format!("..{}", self.addr(*b)));
            }
        }
        k
    }

    fn render_display(&self) -> String {
        let (nf, nl) = host_bounds(&self.network);
        let net = IpNetwork::new(self.network.network(), self.network.prefix())
            .map_or_else(|_| self.network.to_string(), |n| n.to_string());
        if self.first == nf && self.last == nl {
            net
        } else {
            format!(
                "{}-{}/{}",
                u128_to_ip(self.family, self.first),
                u128_to_ip(self.family, self.last),
                self.network.prefix()
            )
        }
    }

    /// How many addresses cutting the range into blocks of prefix length `prefix` keeps
    /// from being handed out beyond its own exclusions: each block's network and last
    /// address (not in a /31 or /32 block), and the address `gateway_index` from its start. Counted, not listed (a
    /// range may hold 2^56 blocks).
    pub fn block_reserved(&self, prefix: u8, gateway_index: Option<u32>) -> u128 {
        let bits: u32 = if self.family == Family::V4 { 32 } else { 128 };
        let Some(shift) = bits.checked_sub(u32::from(prefix)).filter(|s| *s < bits) else { return 0 };
        let base = ip_to_u128(self.network.network());
        let bs = 1u128 << shift;
        // A /31 or /32 block (point-to-point) hands out its network and last address too.
        let mut offsets = if bs > 2 { vec![0, bs - 1] } else { Vec::new() };
        if let Some(gi) = gateway_index.map(u128::from).filter(|gi| *gi < bs && !offsets.contains(gi)) {
            offsets.push(gi);
        }
        // Addresses x <= y with (x - base) % bs == r, counted from base.
        let upto = |y: u128, r: u128| if y < base + r { 0 } else { (y - base - r) / bs + 1 };
        let between = |lo: u128, hi: u128, r: u128| upto(hi, r) - if lo == 0 { 0 } else { upto(lo - 1, r) };
        let mut n = 0;
        for r in offsets {
            n += between(self.first, self.last, r);
            for (lo, hi) in &self.excluded {
                n -= between(self.first + lo, self.first + hi, r);
            }
        }
        n
    }

    /// The range's network (the CIDR, host bits cleared by the prefix).
    pub fn network(&self) -> IpNetwork {
        IpNetwork::new(self.network.network(), self.network.prefix()).unwrap_or(self.network)
    }

    /// Address family.
    pub fn family(&self) -> Family {
        self.family
    }

    /// Prefix length of the range's network.
    pub fn prefix_len(&self) -> u8 {
        self.network.prefix()
    }

    /// Gateway, if configured.
    pub fn gateway(&self) -> Option<IpAddr> {
        self.gateway
    }

    /// Addresses between the first and last that may be handed out.
    pub fn size(&self) -> u128 {
        self.last - self.first + 1
    }

    /// Excluded addresses inside the range, gateway included.
    pub fn excluded_count(&self) -> u128 {
        self.excluded_count
    }

    /// Offset of `ip` from the first address, if `ip` is between first and last.
    pub fn offset(&self, ip: IpAddr) -> Option<u128> {
        if Family::of(ip) != self.family {
            return None;
        }
        let v = ip_to_u128(ip);
        (self.first..=self.last).contains(&v).then(|| v - self.first)
    }

    /// Whether `ip` may be handed out from this range: between first and last, not excluded.
    pub fn allows(&self, ip: IpAddr) -> bool {
        self.offset(ip).is_some_and(|o| self.exclusion_at(o).is_none())
    }

    /// The address at `offset`.
    pub fn addr(&self, offset: u128) -> IpAddr {
        u128_to_ip(self.family, self.first + offset)
    }

    /// The exclusion (offsets, inclusive) that holds `offset`, if any.
    pub fn exclusion_at(&self, offset: u128) -> Option<(u128, u128)> {
        if self.excluded.is_empty() {
            return None;
        }
        let i = self.excluded.partition_point(|(_, hi)| *hi < offset);
        self.excluded.get(i).copied().filter(|(lo, _)| *lo <= offset)
    }
}

/// `a.b.c.d/p` (host bits allowed, dropped) or `first-last/p`.
fn parse_range(raw: &str) -> Option<(IpNetwork, Option<(IpAddr, IpAddr)>)> {
    let (addrs, prefix) = raw.rsplit_once('/')?;
    let prefix: u8 = prefix.parse().ok()?;
    if let Some((a, b)) = addrs.split_once('-') {
        let a: IpAddr = a.trim().parse().ok()?;
        let b: IpAddr = b.trim().parse().ok()?;
        let net = IpNetwork::new(a, prefix).ok()?;
        let net = IpNetwork::new(net.network(), prefix).ok()?;
        Some((net, Some((a, b))))
    } else {
        let ip: IpAddr = addrs.parse().ok()?;
        let net = IpNetwork::new(ip, prefix).ok()?;
        Some((IpNetwork::new(net.network(), prefix).ok()?, None))
    }
}

/// An exclusion as its first and last address.
fn parse_exclusion(raw: &str) -> Option<(IpAddr, IpAddr)> {
    if raw.contains('/') {
        let net: IpNetwork = raw.parse().ok()?;
        Some((net.network(), net.broadcast()))
    } else {
        let ip: IpAddr = raw.parse().ok()?;
        Some((ip, ip))
    }
}

fn push_clipped(out: &mut Vec<(u128, u128)>, lo: u128, hi: u128, first: u128, last: u128) {
    let (lo, hi) = (lo.max(first), hi.min(last));
    if lo <= hi {
        out.push((lo - first, hi - first));
    }
}

fn merge(mut v: Vec<(u128, u128)>) -> Vec<(u128, u128)> {
    v.sort_unstable();
    let mut out: Vec<(u128, u128)> = Vec::with_capacity(v.len());
    for (lo, hi) in v {
        match out.last_mut() {
            Some((_, phi)) if lo <= phi.saturating_add(1) => *phi = (*phi).max(hi),
            _ => out.push((lo, hi)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(range: &str) -> Result<RangeSpec, AllocError> {
        RangeSpec::parse(&RangeInput { range: range.into(), ..Default::default() }, FieldPrefix(""))
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("test address")
    }

    #[test]
    fn cidr_hands_out_network_plus_one_to_last_minus_one() {
        let s = spec("10.0.0.0/24").expect("valid");
        assert_eq!(s.size(), 254);
        assert_eq!(s.addr(0), ip("10.0.0.1"));
        assert_eq!(s.addr(253), ip("10.0.0.254"));
        assert_eq!(s.display(), "10.0.0.0/24");
        assert_eq!(s.offset(ip("10.0.0.0")), None);
        assert_eq!(s.offset(ip("10.0.0.255")), None);
    }

    #[test]
    fn host_bits_in_a_cidr_are_dropped() {
        let s = spec("192.168.2.225/28").expect("valid");
        assert_eq!(s.display(), "192.168.2.224/28");
        assert_eq!(s.addr(0), ip("192.168.2.225"));
        assert_eq!(s.size(), 14);
    }

    #[test]
    fn dash_form_sets_first_and_last() {
        let s = spec("192.168.1.5-192.168.1.25/24").expect("valid");
        assert_eq!(s.addr(0), ip("192.168.1.5"));
        assert_eq!(s.size(), 21);
        assert_eq!(s.display(), "192.168.1.5-192.168.1.25/24");
    }

    #[test]
    fn ipv6_64_has_every_address_but_the_ends() {
        let s = spec("fd00:50::/64").expect("valid");
        assert_eq!(s.size(), (1u128 << 64) - 2);
        assert_eq!(s.addr(0), ip("fd00:50::1"));
        assert_eq!(s.addr(s.size() - 1), ip("fd00:50::ffff:ffff:ffff:fffe"));
    }

    #[test]
    fn errors_name_the_field_and_value() {
        let err = |input: RangeInput| {
            RangeSpec::parse(&input, FieldPrefix("")).expect_err("must be rejected").to_string()
        };
        let r = |range: &str| RangeInput { range: range.into(), ..Default::default() };
        assert_eq!(err(r("10.0.0.0/33")), r#"range "10.0.0.0/33" is not a CIDR or first-last/prefix range"#);
        assert_eq!(err(r("banana")), r#"range "banana" is not a CIDR or first-last/prefix range"#);
        assert_eq!(err(r("")), r#"range "" is empty: a CIDR or first-last/prefix is required"#);
        // Point-to-point: every address of a /31 or /32 is usable.
        let p2p = |range: &str| RangeSpec::parse(&r(range), FieldPrefix("")).map(|s| s.size());
        assert_eq!((p2p("10.0.0.0/31"), p2p("10.0.0.7/32"), p2p("fd00::/127")), (Ok(2), Ok(1), Ok(2)));
        // The fuzzer's: a /128 at the very bottom (and a /32 at the very top) of the space.
        assert_eq!((p2p("::/128"), p2p("255.255.255.255/32")), (Ok(1), Ok(1)));
        assert_eq!(
            RangeSpec::parse(&r("::/128"), FieldPrefix("")).map(|s| s.display().to_string()),
            Ok("::/128".into())
        );
        assert_eq!(
            err(RangeInput { range_start: "10.0.1.5".into(), ..r("10.0.0.0/24") }),
            r#"range_start "10.0.1.5" is outside range 10.0.0.0/24"#
        );
        assert_eq!(
            err(RangeInput { range_end: "fd00::1".into(), ..r("10.0.0.0/24") }),
            r#"range_end "fd00::1" is not an IPv4 address (range 10.0.0.0/24 is IPv4)"#
        );
        assert_eq!(
            err(RangeInput {
                range_start: "10.0.0.9".into(),
                range_end: "10.0.0.8".into(),
                ..r("10.0.0.0/24")
            }),
            r#"range_start "10.0.0.9" is after range_end 10.0.0.8"#
        );
        assert_eq!(
            err(RangeInput { exclude: vec!["10.0.0.0/25".into(), "nope".into()], ..r("10.0.0.0/24") }),
            r#"exclude[1] "nope" is not an IP address or CIDR"#
        );
        assert_eq!(
            err(RangeInput { exclude: vec!["10.0.0.0/24".into()], ..r("10.0.0.0/24") }),
            r#"exclude "10.0.0.0/24" leaves no usable address in range 10.0.0.0/24 (254 addresses, all excluded)"#
        );
        assert_eq!(
            err(RangeInput { gateway: "10.0.0.1/24x".into(), ..r("10.0.0.0/24") }),
            r#"gateway "10.0.0.1/24x" is not an IP address"#
        );
        let prefixed = RangeSpec::parse(&r("x"), FieldPrefix("ranges[1].")).expect_err("bad");
        assert_eq!(prefixed.to_string(), r#"ranges[1].range "x" is not a CIDR or first-last/prefix range"#);
    }

    #[test]
    fn exclusions_merge_and_count_the_gateway() {
        let s = RangeSpec::parse(
            &RangeInput {
                range: "10.0.0.0/24".into(),
                exclude: vec!["10.0.0.0/28".into(), "10.0.0.16".into(), "10.0.1.0/24".into()],
                gateway: "10.0.0.254".into(),
                ..Default::default()
            },
            FieldPrefix(""),
        )
        .expect("valid");
        // .1-.15 (clipped /28) and .16 merge; the gateway .254 is the last offset.
        assert_eq!(s.excluded, vec![(0, 15), (253, 253)]);
        assert_eq!(s.excluded_count(), 17);
        assert_eq!(s.exclusion_at(7), Some((0, 15)));
        assert_eq!(s.exclusion_at(16), None);
        assert_eq!(s.exclusion_at(253), Some((253, 253)));
        assert_eq!(s.key(), "10.0.0.0/24 -10.0.0.1..10.0.0.16 -10.0.0.254");
    }
}
