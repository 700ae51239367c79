//! meshguard's own TOML policy form (see the module docs of [`crate::policy`]).

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;
use toml::Spanned;

use super::model::{
    at_line, build_destination, build_source, parse_port_toml, validate_name, validate_namespace,
    validate_selector, Action, Fail, Item, List, Policy, PolicyError, PolicySet, Rule, SourceLists,
    SourceNames,
};

const SOURCE_NAMES: SourceNames = [
    "principals",
    "not_principals",
    "namespaces",
    "not_namespaces",
    "ip_blocks",
    "not_ip_blocks",
];

type StrList = Option<Spanned<Vec<Spanned<String>>>>;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    policy: Vec<Spanned<RawPolicy>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    name: Option<Spanned<String>>,
    namespace: Option<Spanned<String>>,
    action: Option<Spanned<String>>,
    selector: Option<Spanned<BTreeMap<String, String>>>,
    rules: Option<Spanned<Vec<RawRule>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    from: Option<Spanned<Vec<Spanned<RawSource>>>>,
    to: Option<Spanned<Vec<Spanned<RawDestination>>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSource {
    principals: StrList,
    not_principals: StrList,
    namespaces: StrList,
    not_namespaces: StrList,
    ip_blocks: StrList,
    not_ip_blocks: StrList,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDestination {
    ports: StrList,
    not_ports: StrList,
}

/// The file being parsed, to turn spans into line numbers.
struct Src<'a> {
    text: &'a str,
}

impl Src<'_> {
    /// 1-based line and column of a byte offset.
    fn line_col(&self, offset: usize) -> (usize, usize) {
        crate::config::line_col(self.text, offset)
    }

    fn line<T>(&self, v: &Spanned<T>) -> Option<usize> {
        Some(self.line_col(v.span().start).0)
    }

    fn list<'a>(&self, v: &'a StrList) -> Option<List<'a>> {
        v.as_ref().map(|l| {
            (
                self.line(l),
                l.get_ref()
                    .iter()
                    .map(|s| Item {
                        text: s.get_ref(),
                        line: self.line(s),
                    })
                    .collect(),
            )
        })
    }
}

/// Parses a TOML policy file. `origin` names the file in errors, warnings and
/// [`Policy::origin`].
pub fn parse_toml(text: &str, origin: &Path) -> Result<PolicySet, PolicyError> {
    let src = Src { text };
    let raw: RawFile = toml::from_str(text).map_err(|e| {
        let key = match e.span() {
            Some(span) => {
                let (line, col) = src.line_col(span.start);
                format!("line {line}, column {col}")
            }
            None => String::new(),
        };
        PolicyError::new(origin, key, e.message().trim_end())
    })?;
    let mut set = PolicySet::default();
    for (i, rp) in raw.policy.iter().enumerate() {
        let key = format!("policy[{i}]");
        let policy = build_policy(&src, rp, &key, origin)
            .map_err(|(k, reason)| PolicyError::new(origin, k, reason))?;
        if policy.rules.is_empty() && policy.action != Action::Allow {
            set.warnings.push(format!(
                "{}: {key}: {} policy {} has no rules and never matches; add an empty \
                 [[policy.rules]] to match all traffic",
                origin.display(),
                policy.action,
                policy.id()
            ));
        }
        super::push_policy(&mut set, policy, origin, &key)?;
    }
    Ok(set)
}

fn build_policy(
    src: &Src,
    sp: &Spanned<RawPolicy>,
    key: &str,
    origin: &Path,
) -> Result<Policy, Fail> {
    let rp = sp.get_ref();
    let line = src.line(sp);
    let required = |v: &Option<Spanned<String>>, field: &str| -> Result<String, Fail> {
        match v {
            Some(s) => Ok(s.get_ref().clone()),
            None => Err((
                format!("{key}.{field}"),
                at_line(line, "missing; it is required"),
            )),
        }
    };
    let name = required(&rp.name, "name")?;
    validate_name(&name).map_err(|r| {
        (
            format!("{key}.name"),
            at_line(rp.name.as_ref().and_then(|s| src.line(s)), r),
        )
    })?;
    let namespace = required(&rp.namespace, "namespace")?;
    validate_namespace(&namespace).map_err(|r| {
        (
            format!("{key}.namespace"),
            at_line(rp.namespace.as_ref().and_then(|s| src.line(s)), r),
        )
    })?;
    let action = match &rp.action {
        None => Action::Allow,
        Some(a) => Action::parse(a.get_ref())
            .map_err(|r| (format!("{key}.action"), at_line(src.line(a), r)))?,
    };
    let selector = match &rp.selector {
        None => BTreeMap::new(),
        Some(s) => {
            validate_selector(s.get_ref(), &format!("{key}.selector"))
                .map_err(|(k, r)| (k, at_line(src.line(s), r)))?;
            s.get_ref().clone()
        }
    };
    let mut rules = Vec::new();
    if let Some(raw_rules) = &rp.rules {
        for (r, rr) in raw_rules.get_ref().iter().enumerate() {
            rules.push(build_rule(src, rr, &format!("{key}.rules[{r}]"))?);
        }
    }
    Ok(Policy {
        name,
        namespace,
        selector,
        action,
        rules,
        origin: format!("{}: {key}", origin.display()),
    })
}

fn build_rule(src: &Src, rr: &RawRule, key: &str) -> Result<Rule, Fail> {
    let mut rule = Rule::default();
    if let Some(from) = &rr.from {
        if from.get_ref().is_empty() {
            return Err((
                format!("{key}.from"),
                at_line(
                    src.line(from),
                    "empty list; omit `from` to match any source",
                ),
            ));
        }
        for (f, s) in from.get_ref().iter().enumerate() {
            let fkey = format!("{key}.from[{f}]");
            let raw = s.get_ref();
            let lists = SourceLists {
                principals: src.list(&raw.principals),
                not_principals: src.list(&raw.not_principals),
                namespaces: src.list(&raw.namespaces),
                not_namespaces: src.list(&raw.not_namespaces),
                ip_blocks: src.list(&raw.ip_blocks),
                not_ip_blocks: src.list(&raw.not_ip_blocks),
            };
            if lists.is_empty() {
                return Err((
                    fkey,
                    at_line(
                        src.line(s),
                        "empty source; set at least one field, or omit `from` to match \
                         any source",
                    ),
                ));
            }
            rule.from.push(build_source(lists, &fkey, &SOURCE_NAMES)?);
        }
    }
    if let Some(to) = &rr.to {
        if to.get_ref().is_empty() {
            return Err((
                format!("{key}.to"),
                at_line(
                    src.line(to),
                    "empty list; omit `to` to match any destination",
                ),
            ));
        }
        for (t, d) in to.get_ref().iter().enumerate() {
            let tkey = format!("{key}.to[{t}]");
            let raw = d.get_ref();
            if raw.ports.is_none() && raw.not_ports.is_none() {
                return Err((
                    tkey,
                    at_line(
                        src.line(d),
                        "empty destination; set ports or not_ports, or omit `to` to \
                         match any destination",
                    ),
                ));
            }
            rule.to.push(build_destination(
                src.list(&raw.ports),
                src.list(&raw.not_ports),
                &tkey,
                ["ports", "not_ports"],
                parse_port_toml,
            )?);
        }
    }
    Ok(rule)
}
