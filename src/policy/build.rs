//! The rule builder both policy forms share. Each form's loader reads its own syntax into
//! the drafts below (lists of strings with their keys and, in TOML, their lines); this
//! module checks them and builds the [`Rule`]s and the [`Policy`], so that every check and
//! every message exists once.

use std::collections::BTreeMap;

use super::model::{
    Action, Condition, Destination, Pattern, Policy, PortMatch, Rule, Source, Values,
};
use super::values::{parse_ip_block, parse_namespace_pattern};
use crate::file_error::at_line;

/// A key and the reason its value is wrong, before the file is attached.
#[derive(Debug)]
pub(crate) struct KeyError {
    pub key: String,
    pub reason: String,
}

impl KeyError {
    pub(super) fn new(key: impl Into<String>, reason: impl Into<String>) -> Self {
        KeyError {
            key: key.into(),
            reason: reason.into(),
        }
    }
}

/// How one file form names things, for keys and messages.
pub(crate) struct Form {
    /// The six source fields, in [`SourceLists`] order.
    pub source_fields: [&'static str; 6],
    /// `ports` and `not_ports`.
    pub port_fields: [&'static str; 2],
    /// What one `to` entry is called.
    pub destination_entry: &'static str,
    pub parse_port: fn(&str) -> Result<PortMatch, String>,
    /// Principal values (the TOML form takes both spellings; Istio's only its own).
    pub parse_principal: fn(&str) -> Result<Pattern, String>,
    /// How to write a rule that matches all traffic in this form.
    pub match_all_rule: &'static str,
}

/// One value as written, with its line when the form reports one (TOML).
pub(crate) struct Written<'a> {
    pub text: &'a str,
    pub line: Option<usize>,
}

/// A list as written: the line of the list itself (if known) and its values.
pub(crate) struct WrittenList<'a> {
    pub line: Option<usize>,
    pub values: Vec<Written<'a>>,
}

impl<'a> WrittenList<'a> {
    /// A list from a form that reports no lines.
    pub(super) fn without_lines<S: AsRef<str>>(values: &'a [S]) -> Self {
        WrittenList {
            line: None,
            values: values
                .iter()
                .map(|text| Written {
                    text: text.as_ref(),
                    line: None,
                })
                .collect(),
        }
    }
}

/// The six source lists as written, before parsing.
#[derive(Default)]
pub(crate) struct SourceLists<'a> {
    pub principals: Option<WrittenList<'a>>,
    pub not_principals: Option<WrittenList<'a>>,
    pub namespaces: Option<WrittenList<'a>>,
    pub not_namespaces: Option<WrittenList<'a>>,
    pub ip_blocks: Option<WrittenList<'a>>,
    pub not_ip_blocks: Option<WrittenList<'a>>,
}

impl SourceLists<'_> {
    fn is_empty(&self) -> bool {
        self.principals.is_none()
            && self.not_principals.is_none()
            && self.namespaces.is_none()
            && self.not_namespaces.is_none()
            && self.ip_blocks.is_none()
            && self.not_ip_blocks.is_none()
    }
}

/// A field meshguard cannot check at L3/L4 (Istio's HTTP-only fields), with its values,
/// which must still not be empty.
pub(crate) struct L7Field<'a> {
    pub name: &'static str,
    pub values: Vec<&'a str>,
}

/// One `from` entry as written.
pub(crate) struct SourceDraft<'a> {
    /// The entry's key, such as `policy[0].rules[1].from[0]`.
    pub key: String,
    pub line: Option<usize>,
    pub lists: SourceLists<'a>,
    pub l7: Vec<L7Field<'a>>,
}

/// One `to` entry as written.
pub(crate) struct DestinationDraft<'a> {
    pub key: String,
    pub line: Option<usize>,
    pub ports: Option<WrittenList<'a>>,
    pub not_ports: Option<WrittenList<'a>>,
    pub l7: Vec<L7Field<'a>>,
}

/// A list of entries as written: its line (if known) and the entries.
pub(crate) struct Entries<T> {
    pub line: Option<usize>,
    pub entries: Vec<T>,
}

/// One rule as written.
pub(crate) struct RuleDraft<'a> {
    /// The rule's key, such as `policy[0].rules[1]` or `spec.rules[1]`.
    pub key: String,
    pub from: Option<Entries<SourceDraft<'a>>>,
    pub to: Option<Entries<DestinationDraft<'a>>>,
    /// `when` conditions (Istio's form only).
    pub when: Option<Entries<ConditionDraft<'a>>>,
}

/// One `when` condition as written.
pub(crate) struct ConditionDraft<'a> {
    /// The condition's key in the file, such as `spec.rules[0].when[1]`.
    pub key: String,
    /// The attribute it tests, such as `source.ip`.
    pub attribute: Option<&'a str>,
    pub values: Option<WrittenList<'a>>,
    pub not_values: Option<WrittenList<'a>>,
}

/// A policy whose name, namespace, selector and action are already validated.
pub(crate) struct PolicyDraft<'a> {
    pub name: String,
    pub namespace: String,
    pub selector: BTreeMap<String, String>,
    pub action: Action,
    pub rules: Vec<RuleDraft<'a>>,
    /// Where a warning about the policy's rules as a whole points.
    pub rules_key: String,
    /// Where the policy is defined, for decisions and duplicate errors.
    pub origin: String,
}

/// A warning about what loading changed, with the key it is about.
pub(crate) struct Warning {
    pub key: String,
    pub message: String,
}

/// Checks a draft and builds its policy, with warnings about what had to be adjusted.
pub(crate) fn build_policy(
    draft: PolicyDraft,
    form: &Form,
) -> Result<(Policy, Vec<Warning>), KeyError> {
    let mut warnings = Vec::new();
    let mut rules = Vec::with_capacity(draft.rules.len());
    for rule in draft.rules {
        let key = rule.key.clone();
        let (rule, l7) = build_rule(rule, form)?;
        if l7.is_empty() {
            rules.push(rule);
            continue;
        }
        let fields = l7.join(", ");
        let action = draft.action;
        let (rule, message) = if action == Action::Allow {
            let message = format!(
                "ALLOW rule uses fields meshguard cannot check at L3/L4 ({fields}); the rule \
                 matches nothing"
            );
            let rule = Rule {
                matches_nothing: true,
                ..rule
            };
            (rule, message)
        } else {
            let message = format!(
                "{action} rule uses fields meshguard cannot check at L3/L4 ({fields}); they \
                 are ignored, so the rule applies to all traffic its other fields match"
            );
            (rule, message)
        };
        warnings.push(Warning { key, message });
        rules.push(rule);
    }
    let policy = Policy {
        name: draft.name,
        namespace: draft.namespace,
        selector: draft.selector,
        action: draft.action,
        rules,
        origin: draft.origin,
    };
    if policy.rules.is_empty() && policy.action != Action::Allow {
        warnings.push(Warning {
            key: draft.rules_key,
            message: format!(
                "{} policy {} has no rules and never matches; add {} to match all traffic",
                policy.action,
                policy.id(),
                form.match_all_rule
            ),
        });
    }
    Ok((policy, warnings))
}

/// Builds one rule from its L4 fields; returns it with the names of the L7-only fields
/// it used (what they mean depends on the policy's action).
fn build_rule(draft: RuleDraft, form: &Form) -> Result<(Rule, Vec<String>), KeyError> {
    let key = &draft.key;
    let mut rule = Rule::default();
    let mut l7 = Vec::new();
    if let Some(from) = draft.from {
        let omit = "omit `from` to match any source";
        for source in entries(from, format!("{key}.from"), omit)? {
            check_l7(&source.l7, &source.key, key, &mut l7)?;
            if source.lists.is_empty() && source.l7.is_empty() {
                return Err(empty_entry(source.key, source.line, "source", omit));
            }
            // A source left with no L4 field after dropping L7 ones matches any source.
            rule.from
                .push(build_source(source.lists, &source.key, form)?);
        }
    }
    if let Some(to) = draft.to {
        let omit = "omit `to` to match any destination";
        for destination in entries(to, format!("{key}.to"), omit)? {
            check_l7(&destination.l7, &destination.key, key, &mut l7)?;
            let no_ports = destination.ports.is_none() && destination.not_ports.is_none();
            if no_ports && destination.l7.is_empty() {
                let (key, line) = (destination.key, destination.line);
                return Err(empty_entry(key, line, form.destination_entry, omit));
            }
            let [ports, not_ports] = form.port_fields;
            rule.to.push(Destination {
                ports: parse_list(
                    destination.ports,
                    &format!("{}.{ports}", destination.key),
                    form.parse_port,
                )?,
                not_ports: parse_list(
                    destination.not_ports,
                    &format!("{}.{not_ports}", destination.key),
                    form.parse_port,
                )?,
            });
        }
    }
    if let Some(when) = draft.when {
        let omit = "omit `when` to put no condition on the rule";
        for (w, condition) in entries(when, format!("{key}.when"), omit)?
            .into_iter()
            .enumerate()
        {
            match build_condition(condition, form)? {
                Checked::L4(condition) => rule.when.push(condition),
                Checked::L7(attribute) => l7.push(format!("when[{w}] ({attribute})")),
            }
        }
    }
    Ok((rule, l7))
}

/// What a `when` condition is to meshguard.
enum Checked<'a> {
    L4(Condition),
    /// An attribute of HTTP requests (or of TLS): named, not checked.
    L7(&'a str),
}

/// The attributes Istio also checks for plain TCP.
const L4_ATTRIBUTES: [&str; 5] = [
    "source.ip",
    "source.namespace",
    "source.principal",
    "destination.ip",
    "destination.port",
];

/// Istio's other attributes: exact keys, then `prefix[name]` keys.
const L7_ATTRIBUTES: [&str; 6] = [
    "remote.ip",
    "source.serviceAccount",
    "request.auth.principal",
    "request.auth.audiences",
    "request.auth.presenter",
    "connection.sni",
];
const L7_ATTRIBUTE_PREFIXES: [&str; 3] = [
    "request.headers",
    "request.experimental.inline.headers",
    "request.auth.claims",
];

/// Checks a `when` condition as Istio's validation does (a known attribute, `values` or
/// `notValues`, no empty value, addresses and ports that parse) and builds it if
/// meshguard can check it.
fn build_condition<'a>(draft: ConditionDraft<'a>, form: &Form) -> Result<Checked<'a>, KeyError> {
    let ConditionDraft {
        key,
        attribute,
        values,
        not_values,
    } = draft;
    let attribute = match attribute {
        Some(a) if !a.is_empty() => a,
        _ => {
            return Err(KeyError::new(
                format!("{key}.key"),
                "missing; `key` must name an attribute",
            ))
        }
    };
    if values.is_none() && not_values.is_none() {
        return Err(KeyError::new(
            key,
            format!("at least one of `values` or `notValues` must be set for key {attribute}"),
        ));
    }
    let values_key = format!("{key}.values");
    let not_values_key = format!("{key}.notValues");
    let keys = (values_key.as_str(), not_values_key.as_str());
    let condition = match attribute {
        "source.ip" => Condition::SourceIp(values_of(values, not_values, keys, parse_ip_block)?),
        "destination.ip" => {
            Condition::DestinationIp(values_of(values, not_values, keys, parse_ip_block)?)
        }
        "source.principal" => {
            Condition::SourcePrincipal(values_of(values, not_values, keys, form.parse_principal)?)
        }
        "source.namespace" => Condition::SourceNamespace(values_of(
            values,
            not_values,
            keys,
            parse_namespace_pattern,
        )?),
        "destination.port" => {
            Condition::DestinationPort(values_of(values, not_values, keys, form.parse_port)?)
        }
        "remote.ip" => {
            values_of(values, not_values, keys, parse_ip_block)?;
            return Ok(Checked::L7(attribute));
        }
        "destination.namespace" => {
            return Err(KeyError::new(
                format!("{key}.key"),
                "attribute destination.namespace is replaced by the metadata.namespace",
            ))
        }
        "destination.name" | "destination.user" => {
            return Err(KeyError::new(
                format!("{key}.key"),
                format!("deprecated attribute {attribute}: only supported in v1alpha1"),
            ))
        }
        a if a.starts_with("destination.labels") => {
            return Err(KeyError::new(
                format!("{key}.key"),
                format!("attribute {a} is replaced by the workload selector"),
            ))
        }
        a if L7_ATTRIBUTES.contains(&a) || a.starts_with("experimental.envoy.filters.") => {
            values_of(values, not_values, keys, non_empty)?;
            return Ok(Checked::L7(attribute));
        }
        a => {
            let name = L7_ATTRIBUTE_PREFIXES
                .iter()
                .find_map(|p| a.strip_prefix(*p))
                .map(|rest| rest.strip_prefix('[').and_then(|r| r.strip_suffix(']')));
            return match name {
                Some(Some(name)) if !name.is_empty() => {
                    values_of(values, not_values, keys, non_empty)?;
                    Ok(Checked::L7(attribute))
                }
                Some(_) => Err(KeyError::new(
                    format!("{key}.key"),
                    format!("bad key ({a}): should have format a[b]"),
                )),
                None => Err(KeyError::new(
                    format!("{key}.key"),
                    format!(
                        "unknown attribute {a:?}; the attributes meshguard checks are {}, \
                         and Istio's HTTP attributes are accepted and not checked",
                        L4_ATTRIBUTES.join(", ")
                    ),
                )),
            };
        }
    };
    Ok(Checked::L4(condition))
}

/// Both value lists of a condition, parsed with `parse`; `keys` name them.
fn values_of<T>(
    values: Option<WrittenList>,
    not_values: Option<WrittenList>,
    keys: (&str, &str),
    parse: fn(&str) -> Result<T, String>,
) -> Result<Values<T>, KeyError> {
    Ok(Values {
        values: parse_list(values, keys.0, parse)?,
        not_values: parse_list(not_values, keys.1, parse)?,
    })
}

/// Any value but the empty string (for attributes that are not interpreted).
fn non_empty(s: &str) -> Result<(), String> {
    if s.is_empty() {
        Err("empty value".to_owned())
    } else {
        Ok(())
    }
}

/// The entries of a `from`, `to` or `when` list at `key`. A list that is present but
/// empty is an error: "no entries" would read as "nothing" where it means "anything".
fn entries<T>(list: Entries<T>, key: String, omit: &str) -> Result<Vec<T>, KeyError> {
    if list.entries.is_empty() {
        return Err(KeyError::new(
            key,
            at_line(list.line, format!("empty list; {omit}")),
        ));
    }
    Ok(list.entries)
}

/// An entry of a `from` or `to` list with no field set.
fn empty_entry(key: String, line: Option<usize>, entry: &str, omit: &str) -> KeyError {
    KeyError::new(
        key,
        at_line(
            line,
            format!("empty {entry}; set at least one field, or {omit}"),
        ),
    )
}

/// L7-only lists are not interpreted, but empty ones are still mistakes. Records each
/// field in `used`, named from the rule at `rule_key` on.
fn check_l7(
    fields: &[L7Field],
    entry_key: &str,
    rule_key: &str,
    used: &mut Vec<String>,
) -> Result<(), KeyError> {
    let in_rule = entry_key
        .strip_prefix(rule_key)
        .and_then(|rest| rest.strip_prefix('.'))
        .unwrap_or(entry_key);
    for field in fields {
        let key = format!("{entry_key}.{}", field.name);
        if field.values.is_empty() {
            return Err(KeyError::new(
                key,
                "empty list; omit the field to put no condition on it",
            ));
        }
        if let Some(i) = field.values.iter().position(|v| v.is_empty()) {
            return Err(KeyError::new(format!("{key}[{i}]"), "empty value"));
        }
        used.push(format!("{in_rule}.{}", field.name));
    }
    Ok(())
}

/// Parses the source lists of the entry at `key`.
fn build_source(lists: SourceLists, key: &str, form: &Form) -> Result<Source, KeyError> {
    let field = |i: usize| format!("{key}.{}", form.source_fields[i]);
    Ok(Source {
        principals: parse_list(lists.principals, &field(0), form.parse_principal)?,
        not_principals: parse_list(lists.not_principals, &field(1), form.parse_principal)?,
        namespaces: parse_list(lists.namespaces, &field(2), parse_namespace_pattern)?,
        not_namespaces: parse_list(lists.not_namespaces, &field(3), parse_namespace_pattern)?,
        ip_blocks: parse_list(lists.ip_blocks, &field(4), parse_ip_block)?,
        not_ip_blocks: parse_list(lists.not_ip_blocks, &field(5), parse_ip_block)?,
    })
}

/// Parses every value of an optional list with `parse`, naming `key[i]` on failure.
/// An absent list is empty; a present but empty list is an error, since "no values"
/// would read as "nobody" while it means "no condition".
fn parse_list<T>(
    list: Option<WrittenList>,
    key: &str,
    parse: fn(&str) -> Result<T, String>,
) -> Result<Vec<T>, KeyError> {
    let Some(list) = list else {
        return Ok(Vec::new());
    };
    if list.values.is_empty() {
        return Err(KeyError::new(
            key,
            at_line(
                list.line,
                "empty list; omit the field to put no condition on it",
            ),
        ));
    }
    list.values
        .iter()
        .enumerate()
        .map(|(i, v)| {
            parse(v.text)
                .map_err(|reason| KeyError::new(format!("{key}[{i}]"), at_line(v.line, reason)))
        })
        .collect()
}
