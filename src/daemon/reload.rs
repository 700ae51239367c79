//! Live reconfiguration. The node file, its key files, the peers directory and the
//! policy files are watched; once a change has settled (or on SIGHUP) everything is
//! loaded and checked exactly as at start. A configuration that does not load changes
//! nothing. One that does is applied as a difference: the plaintext filter first, then
//! new interface addresses and routes, then the node (see `Node::reconfigure`), then the
//! addresses and routes that went. Settings the running daemon cannot change are
//! reported as needing a restart and kept as they are.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

use ipnet::IpNet;

use super::log_policy;
use super::worker::Shared;
use crate::config::{self, NodeConfig};
use crate::io::netconf;
use crate::io::plaintext_filter::PlaintextFilter;
use crate::ops::ReloadCounts;
use crate::policy::{self, MtlsMode, PolicySet};

/// How long the watched files must stay unchanged before a change is applied, so that a
/// file caught half-written is not loaded.
const SETTLE_TIME: Duration = Duration::from_millis(500);

/// What identifies a version of the watched files: each file's path with its modified
/// time and length (`None`: missing).
type Stamp = Vec<(PathBuf, Option<(SystemTime, u64)>)>;

/// The files a configuration was loaded from, and the peers directory's current files.
fn stamp(config: &NodeConfig) -> Stamp {
    let mut files: Vec<PathBuf> = vec![config.path.clone()];
    files.extend(config.identities.iter().map(|i| i.private_key_file.clone()));
    files.extend(config.policy.files.iter().cloned());
    if let Some(Ok(entries)) = config.peers_dir.as_ref().map(std::fs::read_dir) {
        let mut peers: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
        peers.sort();
        files.extend(peers);
    }
    files
        .into_iter()
        .map(|path| {
            let version = std::fs::metadata(&path)
                .ok()
                .and_then(|m| Some((m.modified().ok()?, m.len())));
            (path, version)
        })
        .collect()
}

pub(super) struct Reloader {
    /// The configuration in force.
    config: NodeConfig,
    /// The files it came from, as they were.
    loaded: Stamp,
    /// A change seen and when it was last seen to change.
    settling: Option<(Stamp, Instant)>,
    counts: ReloadCounts,
}

/// The addresses of the local identities `policy` puts under STRICT mTLS: the plaintext
/// filter keeps everything but tunnelled traffic away from them.
pub(super) fn strict_addresses(config: &NodeConfig, policy: &PolicySet) -> Vec<IpNet> {
    let root = &config.policy.root_namespace;
    config
        .identities
        .iter()
        .filter(|i| policy.mtls_mode(root, i.principal.namespace(), &i.labels) == MtlsMode::Strict)
        .flat_map(|i| i.addresses.iter().copied())
        .collect()
}

/// Every peer identity's allowed IPs: the routes through the device.
fn routes(config: &NodeConfig) -> BTreeSet<IpNet> {
    config
        .peers
        .iter()
        .flat_map(|p| &p.identities)
        .flat_map(|i| i.allowed_ips.iter().copied())
        .collect()
}

/// Settings the running daemon keeps: `(key, what it is now, what the file says)`.
fn restart_required(running: &NodeConfig, new: &NodeConfig) -> Vec<(&'static str, String, String)> {
    let (a, b) = (&running.interface, &new.interface);
    let mut changed = Vec::new();
    let mut check = |key, now: String, file: String| {
        if now != file {
            changed.push((key, now, file));
        }
    };
    check("listen", running.listen.to_string(), new.listen.to_string());
    check("interface.name", a.name.clone(), b.name.clone());
    check("interface.mtu", a.mtu.to_string(), b.mtu.to_string());
    check(
        "interface.workers",
        format!("{:?}", a.workers),
        format!("{:?}", b.workers),
    );
    check(
        "interface.offload",
        a.offload.to_string(),
        b.offload.to_string(),
    );
    check(
        "interface.udp_coalescing",
        a.udp_coalescing.to_string(),
        b.udp_coalescing.to_string(),
    );
    check(
        "interface.queue_length",
        a.queue_length.to_string(),
        b.queue_length.to_string(),
    );
    check(
        "interface.scheduling",
        a.scheduling.as_str().to_owned(),
        b.scheduling.as_str().to_owned(),
    );
    check(
        "interface.realtime_share_percent",
        a.realtime_share_percent.to_string(),
        b.realtime_share_percent.to_string(),
    );
    let (a, b) = (&running.operations, &new.operations);
    check(
        "admin.listen",
        format!("{:?}", a.admin_listen),
        format!("{:?}", b.admin_listen),
    );
    check(
        "admin.socket_dir",
        a.control_dir.display().to_string(),
        b.control_dir.display().to_string(),
    );
    check(
        "uapi.directory",
        format!("{:?}", a.uapi_dir),
        format!("{:?}", b.uapi_dir),
    );
    check(
        "uapi.private_key",
        a.uapi_private_key.to_string(),
        b.uapi_private_key.to_string(),
    );
    changed
}

impl Reloader {
    pub(super) fn new(config: NodeConfig) -> Self {
        Reloader {
            loaded: stamp(&config),
            config,
            settling: None,
            counts: ReloadCounts::default(),
        }
    }

    /// Looks at the watched files; reloads once a change has been still for
    /// `SETTLE_TIME`. Says whether it tried a reload.
    pub(super) fn poll(&mut self, shared: &Shared, filter: &mut PlaintextFilter) -> bool {
        let current = stamp(&self.config);
        if current == self.loaded {
            self.settling = None;
            return false;
        }
        let now = Instant::now();
        match &self.settling {
            Some((seen, since)) if *seen == current => {
                if now.duration_since(*since) >= SETTLE_TIME {
                    self.settling = None;
                    self.reload(shared, filter, "configuration changed");
                    return true;
                }
            }
            _ => self.settling = Some((current, now)),
        }
        false
    }

    /// Loads the whole configuration again and applies what changed; a configuration
    /// that does not load leaves everything as it is.
    pub(super) fn reload(&mut self, shared: &Shared, filter: &mut PlaintextFilter, why: &str) {
        let started = Instant::now();
        // Whatever happens, this version of the files has been looked at.
        self.loaded = stamp(&self.config);
        self.settling = None;
        let loaded = config::load(&self.config.path).and_then(|new| {
            let policy = policy::load_files(&new.policy.files)?;
            Ok((new, policy))
        });
        match loaded {
            Ok((new, policy)) => {
                self.apply(new, &policy, shared, filter, why, started);
            }
            Err(error) => self.refuse(why, &error),
        }
    }

    /// Makes `new` and `policy` the running configuration, as far as the running daemon
    /// can (see the module's docs); `started` is when the reload began. False if it was
    /// refused (the running configuration stays).
    pub(super) fn apply(
        &mut self,
        mut new: NodeConfig,
        policy: &PolicySet,
        shared: &Shared,
        filter: &mut PlaintextFilter,
        why: &str,
        started: Instant,
    ) -> bool {
        for (key, running, file) in restart_required(&self.config, &new) {
            tracing::warn!(
                file = %new.path.display(),
                key,
                running = %running,
                in_file = %file,
                "restart required: this setting keeps its running value until meshguard restarts"
            );
        }
        // The running listen address and device settings stay; the device's addresses
        // follow the file.
        new.listen = self.config.listen;
        new.operations = self.config.operations.clone();
        new.interface = config::InterfaceConfig {
            addresses: new.interface.addresses,
            ..self.config.interface.clone()
        };

        if let Err(error) = filter.apply(&strict_addresses(&new, policy)) {
            self.refuse(why, &error);
            return false;
        }
        let device = new.interface.name.clone();
        let (old_addresses, new_addresses): (BTreeSet<IpNet>, BTreeSet<IpNet>) = (
            self.config.interface.addresses.iter().copied().collect(),
            new.interface.addresses.iter().copied().collect(),
        );
        let (old_routes, new_routes) = (routes(&self.config), routes(&new));
        // New addresses and routes before the node uses them, stale ones after.
        for address in new_addresses.difference(&old_addresses) {
            if let Err(e) = netconf::add_address(&device, address) {
                tracing::error!(error = %e, "adding an interface address failed");
            }
        }
        for net in new_routes.difference(&old_routes) {
            if let Err(e) = netconf::add_route(&device, net) {
                tracing::error!(error = %e, "adding a route failed");
            }
        }
        {
            let mut state = shared.lock();
            let locked = Instant::now();
            let node = &mut state.node;
            let done = node.reconfigure(locked, &new, policy);
            let node_locked_us = locked.elapsed().as_micros();
            let changes = &done.identities;
            tracing::info!(
                trigger = why,
                identities_added = changes.locals_added,
                identities_changed = changes.locals_changed,
                identities_removed = changes.locals_removed,
                peers_added = changes.peers_added,
                peers_changed = changes.peers_changed,
                peers_removed = changes.peers_removed,
                policies = policy.policies.len(),
                revoked_flows = done.revoked_flows,
                node_locked_us,
                since_load_start_us = started.elapsed().as_micros(),
                "configuration reloaded"
            );
            log_policy(node, policy);
            let c = &mut self.counts;
            c.applied += 1;
            c.identities_added += changes.locals_added as u64;
            c.identities_changed += changes.locals_changed as u64;
            c.identities_removed += changes.locals_removed as u64;
            c.peers_added += changes.peers_added as u64;
            c.peers_changed += changes.peers_changed as u64;
            c.peers_removed += changes.peers_removed as u64;
        }
        for net in old_routes.difference(&new_routes) {
            if let Err(e) = netconf::remove_route(&device, net) {
                tracing::error!(error = %e, "removing a route failed");
            }
        }
        for address in old_addresses.difference(&new_addresses) {
            if let Err(e) = netconf::remove_address(&device, address) {
                tracing::error!(error = %e, "removing an interface address failed");
            }
        }
        self.config = new;
        self.loaded = stamp(&self.config);
        true
    }

    /// The configuration in force.
    pub(super) fn config(&self) -> &NodeConfig {
        &self.config
    }

    pub(super) fn counts(&self) -> &ReloadCounts {
        &self.counts
    }

    pub(super) fn refuse(&mut self, why: &str, error: &dyn std::fmt::Display) {
        self.counts.rejected += 1;
        tracing::error!(
            trigger = why,
            %error,
            "reload refused; the running configuration stays in force"
        );
    }

    /// `reloads_applied=… reloads_rejected=… …` for the counters line.
    pub(super) fn counters(&self) -> String {
        let c = &self.counts;
        format!(
            "reloads_applied={} reloads_rejected={} identities_added={} \
             identities_changed={} identities_removed={} peers_added={} peers_changed={} \
             peers_removed={}",
            c.applied,
            c.rejected,
            c.identities_added,
            c.identities_changed,
            c.identities_removed,
            c.peers_added,
            c.peers_changed,
            c.peers_removed
        )
    }
}
