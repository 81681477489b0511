//! Who may allocate from a pool: its `nodeSelector` and `namespaceSelector`, checked
//! against the labels of the Node and the Namespace the server follows ([`Labels`]).

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::{Arc, RwLock};

use crate::k8s::crd::{PoolSelector, SelectorRequirement};

/// A checked label selector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selector(PoolSelector);

/// What a requirement's operator asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

fn op(r: &SelectorRequirement) -> Option<Op> {
    match r.operator.as_str() {
        "In" => Some(Op::In),
        "NotIn" => Some(Op::NotIn),
        "Exists" => Some(Op::Exists),
        "DoesNotExist" => Some(Op::DoesNotExist),
        _ => None,
    }
}

impl Selector {
    /// Checks `s`; the error is (field under `field`, value, reason).
    pub fn check(field: &str, s: &PoolSelector) -> Result<Selector, (String, String, String)> {
        if s.match_labels.contains_key("") {
            return Err((format!("{field}.matchLabels"), String::new(), "has an empty key".into()));
        }
        for (i, r) in s.match_expressions.iter().enumerate() {
            let at = format!("{field}.matchExpressions[{i}]");
            if r.key.is_empty() {
                return Err((format!("{at}.key"), String::new(), "is empty".into()));
            }
            match op(r) {
                None => {
                    return Err((
                        format!("{at}.operator"),
                        r.operator.clone(),
                        "is not In, NotIn, Exists or DoesNotExist".into(),
                    ));
                }
                Some(Op::In | Op::NotIn) if r.values.is_empty() => {
                    return Err((
                        format!("{at}.values"),
                        String::new(),
                        format!("is empty: {} needs values", r.operator),
                    ));
                }
                Some(Op::Exists | Op::DoesNotExist) if !r.values.is_empty() => {
                    return Err((
                        format!("{at}.values"),
                        r.values.join(","),
                        format!("must be empty with {}", r.operator),
                    ));
                }
                Some(_) => {}
            }
        }
        Ok(Selector(s.clone()))
    }

    /// Whether `labels` satisfy every label and requirement.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.0.match_labels.iter().all(|(k, v)| labels.get(k) == Some(v))
            && self.0.match_expressions.iter().all(|r| {
                let value = labels.get(&r.key);
                match op(r) {
                    Some(Op::In) => value.is_some_and(|v| r.values.contains(v)),
                    Some(Op::NotIn) => value.is_none_or(|v| !r.values.contains(v)),
                    Some(Op::Exists) => value.is_some(),
                    Some(Op::DoesNotExist) => value.is_none(),
                    None => false,
                }
            })
    }
}

/// In `kubectl`'s selector syntax: `rail=a,zone in (z1,z2),!gpu`.
impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts: Vec<String> = self.0.match_labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        for r in &self.0.match_expressions {
            parts.push(match op(r) {
                Some(Op::In) => format!("{} in ({})", r.key, r.values.join(",")),
                Some(Op::NotIn) => format!("{} notin ({})", r.key, r.values.join(",")),
                Some(Op::Exists) => r.key.clone(),
                Some(Op::DoesNotExist) | None => format!("!{}", r.key),
            });
        }
        match parts.is_empty() {
            true => f.write_str("(everything)"),
            false => f.write_str(&parts.join(",")),
        }
    }
}

/// Labels as `k=v,k2=v2`, for messages.
pub fn labels_text(labels: &BTreeMap<String, String>) -> String {
    match labels.is_empty() {
        true => "none".into(),
        false => labels.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(","),
    }
}

/// The labels of every object of one kind, by name, once its source has read them.
pub type LabelMap = HashMap<String, BTreeMap<String, String>>;

/// The Nodes' and Namespaces' labels, filled by a source following the API server
/// (`k8s/labels.rs`); without one, selectors cannot be checked. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Labels {
    /// Whether a source fills them.
    followed: bool,
    nodes: Arc<RwLock<Option<Arc<LabelMap>>>>,
    namespaces: Arc<RwLock<Option<Arc<LabelMap>>>>,
}

/// Which objects' labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Node,
    Namespace,
}

impl Kind {
    fn field(self) -> &'static str {
        match self {
            Kind::Node => "nodeSelector",
            Kind::Namespace => "namespaceSelector",
        }
    }

    fn noun(self) -> &'static str {
        match self {
            Kind::Node => "node",
            Kind::Namespace => "namespace",
        }
    }
}

/// Why an attachment may not allocate from a pool.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error(
        "pool {pool:?} does not admit {noun} {name:?}: its {field} {selector} does not select it (labels: {labels})",
        noun = kind.noun(), field = kind.field()
    )]
    NotSelected { pool: String, kind: Kind, name: String, selector: String, labels: String },
    #[error(
        "pool {pool:?} has a {field} ({selector}), and the attachment names no {noun}",
        noun = kind.noun(), field = kind.field()
    )]
    Unnamed { pool: String, kind: Kind, selector: String },
    #[error("pool {pool:?} has a {field} ({selector}), and there is no {noun} {name:?}", noun = kind.noun(), field = kind.field())]
    Missing { pool: String, kind: Kind, name: String, selector: String },
    #[error(
        "pool {pool:?} has a {field} ({selector}), and this server does not read {noun}s: run it on the kube store or give it --kubeconfig",
        noun = kind.noun(), field = kind.field()
    )]
    NoSource { pool: String, kind: Kind, selector: String },
    #[error(
        "pool {pool:?} has a {field} ({selector}), and the {noun}s have not been read yet; try again",
        noun = kind.noun(), field = kind.field()
    )]
    NotLoaded { pool: String, kind: Kind, selector: String },
}

impl Refusal {
    /// Whether asking again later may succeed (the labels are still being read).
    pub fn is_transient(&self) -> bool {
        matches!(self, Refusal::NotLoaded { .. })
    }
}

impl Labels {
    /// Labels no source fills: a pool with a selector admits nobody, saying why.
    pub fn none() -> Labels {
        Labels::default()
    }

    /// Labels a source will fill; until it has, a pool with a selector asks to try again.
    pub fn followed() -> Labels {
        Labels { followed: true, ..Labels::default() }
    }

    fn slot(&self, kind: Kind) -> &RwLock<Option<Arc<LabelMap>>> {
        match kind {
            Kind::Node => &self.nodes,
            Kind::Namespace => &self.namespaces,
        }
    }

    /// Replaces every object's labels of `kind`.
    pub fn replace(&self, kind: Kind, map: LabelMap) {
        *self.slot(kind).write().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(Arc::new(map));
    }

    /// The labels of every object of `kind`, once read.
    pub fn all(&self, kind: Kind) -> Option<Arc<LabelMap>> {
        self.slot(kind).read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// Whether `selector` of `pool` admits the object `name` of `kind`.
    pub fn admit(&self, pool: &str, kind: Kind, selector: &Selector, name: &str) -> Result<(), Refusal> {
        let (pool, sel) = (pool.to_string(), selector.to_string());
        if name.is_empty() {
            return Err(Refusal::Unnamed { pool, kind, selector: sel });
        }
        let Some(all) = self.all(kind) else {
            return Err(match self.followed {
                true => Refusal::NotLoaded { pool, kind, selector: sel },
                false => Refusal::NoSource { pool, kind, selector: sel },
            });
        };
        let Some(labels) = all.get(name) else {
            return Err(Refusal::Missing { pool, kind, name: name.to_string(), selector: sel });
        };
        match selector.matches(labels) {
            true => Ok(()),
            false => Err(Refusal::NotSelected {
                pool,
                kind,
                name: name.to_string(),
                selector: sel,
                labels: labels_text(labels),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(key: &str, operator: &str, values: &[&str]) -> SelectorRequirement {
        SelectorRequirement {
            key: key.into(),
            operator: operator.into(),
            values: values.iter().map(|v| v.to_string()).collect(),
        }
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn selectors_match_as_kubernetes_does_and_print_as_kubectl_writes_them() {
        let s = Selector::check(
            "spec.nodeSelector",
            &PoolSelector {
                match_labels: labels(&[("rail", "a")]),
                match_expressions: vec![
                    req("zone", "In", &["z1", "z2"]),
                    req("tier", "NotIn", &["batch"]),
                    req("gpu", "Exists", &[]),
                    req("cordoned", "DoesNotExist", &[]),
                ],
            },
        )
        .expect("valid");
        assert_eq!(s.to_string(), "rail=a,zone in (z1,z2),tier notin (batch),gpu,!cordoned");
        assert!(s.matches(&labels(&[("rail", "a"), ("zone", "z2"), ("gpu", "h100")])));
        assert!(!s.matches(&labels(&[("rail", "b"), ("zone", "z2"), ("gpu", "h100")])));
        assert!(!s.matches(&labels(&[("rail", "a"), ("zone", "z3"), ("gpu", "h100")])));
        assert!(!s.matches(&labels(&[("rail", "a"), ("zone", "z1"), ("gpu", "h100"), ("tier", "batch")])));
        assert!(!s.matches(&labels(&[("rail", "a"), ("zone", "z1")])));
        assert!(!s.matches(&labels(&[("rail", "a"), ("zone", "z1"), ("gpu", "x"), ("cordoned", "")])));
        let everything = Selector::check("f", &PoolSelector::default()).expect("valid");
        assert!(everything.matches(&BTreeMap::new()));
        assert_eq!(everything.to_string(), "(everything)");
    }

    #[test]
    fn bad_selectors_name_the_field() {
        let check = |r: SelectorRequirement| {
            let s = PoolSelector { match_expressions: vec![r], ..Default::default() };
            Selector::check("spec.namespaceSelector", &s).expect_err("invalid")
        };
        assert_eq!(
            check(req("team", "Equals", &["a"])),
            (
                "spec.namespaceSelector.matchExpressions[0].operator".into(),
                "Equals".into(),
                "is not In, NotIn, Exists or DoesNotExist".into()
            )
        );
        assert_eq!(check(req("team", "In", &[])).2, "is empty: In needs values");
        assert_eq!(check(req("team", "Exists", &["a"])).2, "must be empty with Exists");
        assert_eq!(check(req("", "Exists", &[])).0, "spec.namespaceSelector.matchExpressions[0].key");
    }

    #[test]
    fn admission_says_why_not() {
        let sel = Selector::check(
            "f",
            &PoolSelector { match_labels: labels(&[("team", "a")]), ..Default::default() },
        )
        .expect("valid");
        let none = Labels::none();
        assert_eq!(
            none.admit("rail0", Kind::Namespace, &sel, "ml").expect_err("no source").to_string(),
            r#"pool "rail0" has a namespaceSelector (team=a), and this server does not read namespaces: run it on the kube store or give it --kubeconfig"#
        );
        let followed = Labels::followed();
        let waiting = followed.admit("rail0", Kind::Namespace, &sel, "ml").expect_err("not read");
        assert!(waiting.is_transient(), "{waiting}");
        followed
            .replace(Kind::Namespace, [("ml".to_string(), labels(&[("team", "b")]))].into_iter().collect());
        assert_eq!(
            followed.admit("rail0", Kind::Namespace, &sel, "ml").expect_err("not selected").to_string(),
            r#"pool "rail0" does not admit namespace "ml": its namespaceSelector team=a does not select it (labels: team=b)"#
        );
        assert_eq!(
            followed.admit("rail0", Kind::Namespace, &sel, "gone").expect_err("missing").to_string(),
            r#"pool "rail0" has a namespaceSelector (team=a), and there is no namespace "gone""#
        );
        assert_eq!(
            followed.admit("rail0", Kind::Node, &sel, "").expect_err("unnamed").to_string(),
            r#"pool "rail0" has a nodeSelector (team=a), and the attachment names no node"#
        );
        followed
            .replace(Kind::Namespace, [("ml".to_string(), labels(&[("team", "a")]))].into_iter().collect());
        assert_eq!(followed.admit("rail0", Kind::Namespace, &sel, "ml"), Ok(()));
    }
}
