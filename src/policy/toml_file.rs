//! meshguard's own TOML policy form (see the module docs of [`crate::policy`]).

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;
use toml::Spanned;

use super::build::{
    build_policy, DestinationDraft, Entries, Form, KeyError, PolicyDraft, RuleDraft, SourceDraft,
    SourceLists, Written, WrittenList,
};
use super::model::{Action, MtlsMode, PeerAuthentication, PolicySet};
use super::values::{
    parse_port_toml, parse_principal_pattern, validate_name, validate_namespace, validate_selector,
};
use crate::file_error::{at_line, FileError, TomlFile};

const FORM: Form = Form {
    source_fields: [
        "principals",
        "not_principals",
        "namespaces",
        "not_namespaces",
        "ip_blocks",
        "not_ip_blocks",
    ],
    port_fields: ["ports", "not_ports"],
    destination_entry: "destination",
    parse_port: parse_port_toml,
    parse_principal: parse_principal_pattern,
    match_all_rule: "an empty [[policy.rules]]",
};

type StrList = Option<Spanned<Vec<Spanned<String>>>>;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    #[serde(default)]
    policy: Vec<Spanned<TomlPolicy>>,
    #[serde(default)]
    peer_authentication: Vec<Spanned<TomlPeerAuthentication>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TomlPeerAuthentication {
    name: Option<Spanned<String>>,
    namespace: Option<Spanned<String>>,
    selector: Option<Spanned<BTreeMap<String, String>>>,
    mode: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TomlPolicy {
    name: Option<Spanned<String>>,
    namespace: Option<Spanned<String>>,
    action: Option<Spanned<String>>,
    selector: Option<Spanned<BTreeMap<String, String>>>,
    rules: Option<Spanned<Vec<TomlRule>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TomlRule {
    from: Option<Spanned<Vec<Spanned<TomlSource>>>>,
    to: Option<Spanned<Vec<Spanned<TomlDestination>>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TomlSource {
    principals: StrList,
    not_principals: StrList,
    namespaces: StrList,
    not_namespaces: StrList,
    ip_blocks: StrList,
    not_ip_blocks: StrList,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TomlDestination {
    ports: StrList,
    not_ports: StrList,
}

/// Lines of spanned values in the file being read.
struct Lines<'a>(TomlFile<'a>);

impl Lines<'_> {
    fn of<T>(&self, v: &Spanned<T>) -> Option<usize> {
        Some(self.0.line(&v.span()))
    }

    fn list<'v>(&self, v: &'v StrList) -> Option<WrittenList<'v>> {
        v.as_ref().map(|list| WrittenList {
            line: self.of(list),
            values: list
                .get_ref()
                .iter()
                .map(|s| Written {
                    text: s.get_ref(),
                    line: self.of(s),
                })
                .collect(),
        })
    }
}

/// Parses a TOML policy file. `origin` names the file in errors, warnings and
/// [`Policy::origin`](super::Policy::origin).
pub fn parse_toml(text: &str, origin: &Path) -> Result<PolicySet, FileError> {
    let mut set = PolicySet::default();
    read_toml(text, origin, &mut set)?;
    Ok(set)
}

/// Parses a TOML policy file into `set`.
pub(crate) fn read_toml(text: &str, origin: &Path, set: &mut PolicySet) -> Result<(), FileError> {
    let file = TomlFile::new(origin, text);
    let raw: PolicyFile = file.parse()?;
    let lines = Lines(file);
    for (i, policy) in raw.policy.iter().enumerate() {
        let key = format!("policy[{i}]");
        let error = |e: KeyError| FileError::new(origin, e.key, e.reason);
        let draft = draft_policy(&lines, policy, &key, origin).map_err(error)?;
        let (policy, warnings) = build_policy(draft, &FORM).map_err(error)?;
        for w in warnings {
            set.warnings
                .push(format!("{}: {}: {}", origin.display(), w.key, w.message));
        }
        set.add(policy, origin, &key)?;
    }
    for (i, raw) in raw.peer_authentication.iter().enumerate() {
        let key = format!("peer_authentication[{i}]");
        let peer_authentication = read_peer_authentication(&lines, raw, &key, origin)
            .map_err(|e| FileError::new(origin, e.key, e.reason))?;
        set.add_peer_authentication(peer_authentication, origin, &key)?;
    }
    Ok(())
}

/// A `[[peer_authentication]]`: name, namespace and mode are required (a table that
/// sets no mode is more likely a mistake than Istio's `UNSET`).
fn read_peer_authentication(
    lines: &Lines,
    spanned: &Spanned<TomlPeerAuthentication>,
    key: &str,
    origin: &Path,
) -> Result<PeerAuthentication, KeyError> {
    let raw = spanned.get_ref();
    let line = lines.of(spanned);
    let required = |v: &Option<Spanned<String>>, field: &str| match v {
        Some(s) => Ok((s.get_ref().clone(), lines.of(s))),
        None => Err(KeyError::new(
            format!("{key}.{field}"),
            at_line(line, "missing; it is required"),
        )),
    };
    let invalid = |field: &'static str, at: Option<usize>| {
        move |reason: String| KeyError::new(format!("{key}.{field}"), at_line(at, reason))
    };
    let (name, name_line) = required(&raw.name, "name")?;
    validate_name(&name).map_err(invalid("name", name_line))?;
    let (namespace, namespace_line) = required(&raw.namespace, "namespace")?;
    validate_namespace(&namespace).map_err(invalid("namespace", namespace_line))?;
    let (mode, mode_line) = required(&raw.mode, "mode")?;
    let mode = MtlsMode::parse(&mode).map_err(invalid("mode", mode_line))?;
    let selector = match &raw.selector {
        None => BTreeMap::new(),
        Some(s) => {
            validate_selector(s.get_ref()).map_err(invalid("selector", lines.of(s)))?;
            s.get_ref().clone()
        }
    };
    Ok(PeerAuthentication {
        name,
        namespace,
        selector,
        mode,
        origin: format!("{}: {key}", origin.display()),
    })
}

fn draft_policy<'a>(
    lines: &Lines,
    spanned: &'a Spanned<TomlPolicy>,
    key: &str,
    origin: &Path,
) -> Result<PolicyDraft<'a>, KeyError> {
    let raw = spanned.get_ref();
    let line = lines.of(spanned);
    let required = |v: &Option<Spanned<String>>, field: &str| -> Result<String, KeyError> {
        match v {
            Some(s) => Ok(s.get_ref().clone()),
            None => Err(KeyError::new(
                format!("{key}.{field}"),
                at_line(line, "missing; it is required"),
            )),
        }
    };
    let invalid = |field: &'static str, at: Option<usize>| {
        move |reason: String| KeyError::new(format!("{key}.{field}"), at_line(at, reason))
    };
    let name = required(&raw.name, "name")?;
    let name_line = raw.name.as_ref().and_then(|s| lines.of(s));
    validate_name(&name).map_err(invalid("name", name_line))?;
    let namespace = required(&raw.namespace, "namespace")?;
    let namespace_line = raw.namespace.as_ref().and_then(|s| lines.of(s));
    validate_namespace(&namespace).map_err(invalid("namespace", namespace_line))?;
    let action = match &raw.action {
        None => Action::Allow,
        Some(a) => Action::parse(a.get_ref()).map_err(invalid("action", lines.of(a)))?,
    };
    let selector = match &raw.selector {
        None => BTreeMap::new(),
        Some(s) => {
            validate_selector(s.get_ref()).map_err(invalid("selector", lines.of(s)))?;
            s.get_ref().clone()
        }
    };
    let rules = raw.rules.as_ref().map_or_else(Vec::new, |rules| {
        rules
            .get_ref()
            .iter()
            .enumerate()
            .map(|(r, rule)| draft_rule(lines, rule, format!("{key}.rules[{r}]")))
            .collect()
    });
    Ok(PolicyDraft {
        name,
        namespace,
        selector,
        action,
        rules,
        rules_key: key.to_owned(),
        origin: format!("{}: {key}", origin.display()),
    })
}

fn draft_rule<'a>(lines: &Lines, rule: &'a TomlRule, key: String) -> RuleDraft<'a> {
    let from = rule.from.as_ref().map(|from| Entries {
        line: lines.of(from),
        entries: from
            .get_ref()
            .iter()
            .enumerate()
            .map(|(f, source)| {
                let raw = source.get_ref();
                SourceDraft {
                    key: format!("{key}.from[{f}]"),
                    line: lines.of(source),
                    lists: SourceLists {
                        principals: lines.list(&raw.principals),
                        not_principals: lines.list(&raw.not_principals),
                        namespaces: lines.list(&raw.namespaces),
                        not_namespaces: lines.list(&raw.not_namespaces),
                        ip_blocks: lines.list(&raw.ip_blocks),
                        not_ip_blocks: lines.list(&raw.not_ip_blocks),
                    },
                    l7: Vec::new(),
                }
            })
            .collect(),
    });
    let to = rule.to.as_ref().map(|to| Entries {
        line: lines.of(to),
        entries: to
            .get_ref()
            .iter()
            .enumerate()
            .map(|(t, destination)| DestinationDraft {
                key: format!("{key}.to[{t}]"),
                line: lines.of(destination),
                ports: lines.list(&destination.get_ref().ports),
                not_ports: lines.list(&destination.get_ref().not_ports),
                l7: Vec::new(),
            })
            .collect(),
    });
    RuleDraft {
        key,
        from,
        to,
        when: None,
    }
}
