//! The running daemon: wires the sans-IO node to the TUN device and the UDP sockets.
//!
//! Data-path workers (see `worker`) each serve one TUN queue and one UDP socket, a batch
//! at a time, and share the node behind a lock taken once per batch. The control task
//! owns everything else: the node's timer, signals, policy reload and shutdown.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use tokio::signal::unix::{signal, SignalKind};
use tokio::task::JoinSet;

use crate::config::{NodeConfig, MAX_AUTO_WORKERS};
use crate::identity::LocalId;
use crate::io::netconf;
use crate::io::plaintext_filter::PlaintextFilter;
use crate::io::tun::Tun;
use crate::io::udp::Udp;
use crate::node::Node;
use crate::policy::PolicySet;
use crate::proto;

mod reload;
mod send_errors;
mod worker;

use reload::Reloader;
use worker::Shared;

/// How often the configuration files are looked at for changes.
const WATCH_INTERVAL: Duration = Duration::from_millis(250);

/// Runs the daemon for `config` and its loaded allow list until SIGINT or SIGTERM.
pub(crate) fn run(config: NodeConfig, policy: PolicySet) -> Result<()> {
    let workers = worker_count(&config);
    let runtime = if workers == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .enable_all()
            .build()
    }
    .context("starting the async runtime")?;
    runtime.block_on(serve(config, policy, workers))
}

/// `interface.workers`, or one per two cores this process may run on (at least one, at
/// most `MAX_AUTO_WORKERS`): the kernel's half of every packet (TUN, UDP, the workloads'
/// own TCP stacks) needs about as much CPU as the daemon's.
fn worker_count(config: &NodeConfig) -> usize {
    config.interface.workers.unwrap_or_else(|| {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        (cores / 2).clamp(1, MAX_AUTO_WORKERS)
    })
}

fn log_policy(node: &Node, policy: &PolicySet) {
    for warning in &policy.warnings {
        tracing::warn!(%warning, "policy adjusted");
    }
    let modes = node.mtls_modes(policy);
    for (index, (local, mode)) in node.locals().iter().zip(modes).enumerate() {
        let selected = node.policy().selected_by_allow(LocalId::new(index));
        tracing::info!(
            identity = %local.principal,
            selected_by_allow_policy = selected,
            mtls = ?mode,
            "allow list"
        );
    }
}

/// The node's counters, the send errors, the reloads and the plaintext filter's drops,
/// on one line.
fn counters_line(
    node: &Node,
    shared: &Shared,
    reloader: &Reloader,
    filter: &PlaintextFilter,
) -> String {
    let mut line = format!(
        "{} {} {}",
        node.counters(),
        shared.send_errors.counters(),
        reloader.counters()
    );
    if let Some(dropped) = filter.dropped() {
        line.push_str(&format!(" plaintext_dropped={dropped}"));
    }
    line
}

fn unix_now() -> Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
}

/// Creates the TUN device with its addresses and a route for every peer's allowed IPs.
/// Returns one handle per queue.
fn setup_interface(config: &NodeConfig, queues: usize) -> Result<Vec<Tun>> {
    let interface = &config.interface;
    let tun = Tun::create(
        &interface.name,
        interface.mtu,
        interface.offload,
        queues,
        interface.queue_length,
    )
    .with_context(|| format!("creating TUN device {}", interface.name))?;
    let name = interface.name.as_str();
    for address in &interface.addresses {
        netconf::add_address(name, address)?;
    }
    for peer in &config.peers {
        for identity in &peer.identities {
            for net in &identity.allowed_ips {
                netconf::add_route(name, net)?;
            }
        }
    }
    Ok(tun)
}

async fn serve(config: NodeConfig, policy: PolicySet, workers: usize) -> Result<()> {
    let node = Node::new(
        &config,
        &policy,
        proto::os_random(),
        Instant::now(),
        unix_now(),
    );
    log_policy(&node, &policy);
    let (identities, peer_identities) = (node.locals().len(), node.peers().len());
    // Before the addresses exist on the device: a STRICT address never takes plaintext.
    let strict = reload::strict_addresses(&config, &policy);
    let mut filter = PlaintextFilter::new(&config.interface.name);
    filter.apply(&strict)?;
    if !strict.is_empty() {
        tracing::info!(
            table = filter.table(),
            addresses = strict.len(),
            "plaintext to STRICT identities is dropped"
        );
    }
    let shared = Shared::new(node);
    let mut watch = tokio::time::interval(WATCH_INTERVAL);
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut report = signal(SignalKind::user_defined1())?;
    let mut hangup = signal(SignalKind::hangup())?;
    let sockets: Vec<Arc<Udp>> = Udp::bind_group(config.listen, workers)
        .with_context(|| format!("binding UDP {}", config.listen))?
        .into_iter()
        .map(Arc::new)
        .collect();
    // If anything below fails, the device is dropped and the kernel removes it.
    let queues = setup_interface(&config, workers)?;
    tracing::info!(
        node = %config.name,
        listen = %sockets[0].local_addr()?,
        interface = %config.interface.name,
        identities,
        peer_identities,
        workers,
        "meshguard is up"
    );
    let control_socket = Arc::clone(&sockets[0]);
    let mut running = JoinSet::new();
    for (tun, socket) in queues.into_iter().zip(sockets) {
        running.spawn(worker::run(
            Arc::clone(&shared),
            tun,
            socket,
            config.interface.mtu,
        ));
    }

    let mut reloader = Reloader::new(config);
    let mut transmits = Vec::new();
    let outcome = loop {
        let wake = {
            let mut state = shared.lock();
            state.armed = state.node.poll_timeout();
            state
                .armed
                .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600))
        };
        tokio::select! {
            _ = tokio::time::sleep_until(wake.into()) => {
                let mut state = shared.lock();
                state.node.handle_timeout(Instant::now());
                shared.finish(&mut state, &mut transmits);
            }
            // A worker moved the deadline: re-arm.
            _ = shared.timer_moved.notified() => {}
            stopped = running.join_next() => {
                break match stopped {
                    Some(Ok(Err(e))) => Err(e.context("data-path worker stopped")),
                    Some(Err(e)) => Err(anyhow::anyhow!("data-path worker failed: {e}")),
                    _ => Err(anyhow::anyhow!("data-path worker stopped")),
                };
            }
            _ = terminate.recv() => break Ok(()),
            _ = interrupt.recv() => break Ok(()),
            _ = report.recv() => {
                let state = shared.lock();
                for line in state.node.decision_counters() {
                    tracing::info!(decisions = %line, "allow-list decisions");
                }
                let counters = counters_line(&state.node, &shared, &reloader, &filter);
                tracing::info!(%counters, "counters");
            }
            _ = hangup.recv() => reloader.reload(&shared, &mut filter, "SIGHUP"),
            _ = watch.tick() => reloader.poll(&shared, &mut filter),
        }
        worker::send_transmits(&control_socket, &shared.send_errors, &mut transmits).await;
    };
    // Stop the workers first: their queues close and the kernel removes the device.
    running.shutdown().await;
    let state = shared.lock();
    for line in state.node.decision_counters() {
        tracing::info!(decisions = %line, "allow-list decisions");
    }
    let counters = counters_line(&state.node, &shared, &reloader, &filter);
    tracing::info!(%counters, "meshguard stopping");
    drop(state);
    if let Err(e) = filter.remove() {
        tracing::error!(error = %e, "removing the plaintext filter failed");
    }
    outcome
}
