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

use crate::config::{NodeConfig, Scheduling, MAX_AUTO_WORKERS};
use crate::identity::LocalId;
use crate::io::netconf;
use crate::io::plaintext_filter::PlaintextFilter;
use crate::io::scheduling;
use crate::io::tun::Tun;
use crate::io::udp::Udp;
use crate::node::Node;
use crate::ops::{self, DaemonStatus};
use crate::policy::PolicySet;
use crate::proto;

mod admin;
#[cfg(feature = "kubernetes")]
mod cluster;
#[cfg(not(feature = "kubernetes"))]
mod cluster {
    //! Built without Kubernetes mode: there is never a cluster source.
    use crate::ops::KubernetesCounts;
    use crate::policy::PolicySet;

    pub(super) const SETTLE_TIME: std::time::Duration = std::time::Duration::ZERO;

    pub(super) enum ClusterSource {}

    impl ClusterSource {
        pub(super) fn compose(
            &mut self,
        ) -> Result<(crate::config::NodeConfig, PolicySet), std::convert::Infallible> {
            match *self {}
        }
        pub(super) fn applied(&mut self) {
            match *self {}
        }
        pub(super) async fn changed(&self) {
            match *self {}
        }
        pub(super) fn counts(&self) -> KubernetesCounts {
            match *self {}
        }
    }
}
mod control;
mod reload;
mod status_socket;
mod systemd;
mod uapi;
mod unix_socket;
mod worker;
mod write_errors;

use cluster::ClusterSource;
use control::{Control, Request, Snapshot};
use reload::Reloader;
use status_socket::StatusSocket;
use uapi::UapiSockets;
use worker::Shared;

pub(crate) use status_socket::fetch as fetch_status;

/// How often the configuration files are looked at for changes.
const WATCH_INTERVAL: Duration = Duration::from_millis(250);

/// Runs the daemon for `config` and its loaded allow list until SIGINT or SIGTERM.
pub(crate) fn run(config: NodeConfig, policy: PolicySet) -> Result<()> {
    let workers = worker_count(&config);
    let share = scheduling::RealtimeShare {
        percent: config.interface.realtime_share_percent,
    };
    let realtime = take_scheduling(config.interface.scheduling, share);
    let mut builder = if workers == 1 {
        // This thread runs everything, the worker included.
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        if realtime {
            // Threads do not inherit the priority (SCHED_RESET_ON_FORK): each takes it.
            builder.on_thread_start(move || {
                if let Err(e) = scheduling::take_realtime_within(share) {
                    tracing::warn!(error = %e, "a runtime thread runs at normal priority");
                }
            });
            builder.on_thread_stop(scheduling::leave_realtime_group);
        }
        builder.worker_threads(workers);
        builder
    };
    if realtime {
        // A thread about to sleep measures the threads' shares when a window has ended
        // (a busy worker does so after each batch), so quiet ones are raised again.
        builder.on_thread_park(scheduling::keep_within_share);
    }
    let runtime = builder
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let threads = Threads {
        workers,
        realtime,
        share_percent: share.percent,
    };
    runtime.block_on(async {
        if config.kubernetes.is_none() {
            return serve(config, policy, threads, None).await;
        }
        #[cfg(feature = "kubernetes")]
        {
            let (source, config, policy) = ClusterSource::start(config).await?;
            serve(config, policy, threads, Some(source)).await
        }
        #[cfg(not(feature = "kubernetes"))]
        anyhow::bail!(
            "the node file has [kubernetes], but this meshguard was built without Kubernetes \
             mode: build with `--features kubernetes`"
        )
    })
}

/// The daemon's data-path threads: how many, and whether at real-time priority.
#[derive(Clone, Copy)]
struct Threads {
    workers: usize,
    realtime: bool,
    /// `interface.realtime_share_percent`.
    share_percent: u32,
}

/// Gives this thread the priority `interface.scheduling` asks for, and says what came
/// of it. Returns whether the daemon's threads are to run at real-time priority.
fn take_scheduling(wanted: Scheduling, share: scheduling::RealtimeShare) -> bool {
    if wanted == Scheduling::Normal {
        tracing::info!("threads run at normal priority (interface.scheduling = \"normal\")");
        return false;
    }
    match scheduling::take_realtime_within(share) {
        Ok(()) => {
            tracing::info!(
                priority = scheduling::REALTIME_PRIORITY,
                share_percent = share.percent,
                "threads run at real-time priority (SCHED_FIFO) while each uses at most \
                 share_percent of a core"
            );
            true
        }
        Err(e) => {
            tracing::warn!(
                error = %e,
                "threads run at normal priority: real-time priority needs CAP_SYS_NICE or an \
                 RLIMIT_RTPRIO of at least 1 (interface.scheduling = \"normal\" stops asking); \
                 on busy cores, packets wait longer"
            );
            false
        }
    }
}

/// Sleeps until `at`; never wakes for `None`.
async fn sleep_until_some(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
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

/// The node's counters, the UDP send and TUN write errors, the reloads and the
/// plaintext filter's drops, on one line.
fn counters_line(
    node: &Node,
    shared: &Shared,
    reloader: &Reloader,
    filter: &PlaintextFilter,
) -> String {
    let mut line = format!(
        "{} {} tun_write_errors={} {}",
        node.counters(),
        shared.send_errors.counters(),
        shared.tun_write_errors.packets(),
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
        interface.udp_coalescing,
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

/// What the daemon is, for its reports; fixed while it runs.
struct Identity {
    name: String,
    interface: String,
    listen: std::net::SocketAddr,
    threads: Threads,
    started_at: u64,
}

/// The control task's answer to a server's request.
fn answer(
    request: Request,
    about: &Identity,
    shared: &Shared,
    reloader: &Reloader,
    cluster: Option<&ClusterSource>,
) {
    let config = reloader.config();
    let (node, private_keys) = {
        let state = shared.lock();
        let keys = if request.private_keys {
            config
                .identities
                .iter()
                .map(|i| i.private_key.clone())
                .collect()
        } else {
            Vec::new()
        };
        (state.node.status(), keys)
    };
    let uapi_names = ops::uapi::socket_names(&about.interface, node.identities.len());
    let status = DaemonStatus {
        name: about.name.clone(),
        interface: about.interface.clone(),
        listen: about.listen,
        workers: about.threads.workers,
        realtime: about.threads.realtime,
        realtime_share_percent: about.threads.share_percent,
        realtime_drops: scheduling::drops_to_normal(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        started_at: about.started_at,
        uapi_names,
        reloads: reloader.counts().clone(),
        send_errors: shared
            .send_errors
            .counts()
            .map(|(kind, n)| (kind.to_owned(), n))
            .collect(),
        tun_write_errors: shared.tun_write_errors.packets(),
        plaintext_dropped: None,
        kubernetes: cluster.map(ClusterSource::counts),
        node,
    };
    let _ = request.reply.send(Snapshot {
        status,
        private_keys,
    });
}

/// Runs the node of `config` and `policy` until SIGINT or SIGTERM: from then on, changes
/// come from the files, or from the cluster when there is a `cluster` source.
async fn serve(
    config: NodeConfig,
    policy: PolicySet,
    threads: Threads,
    mut cluster: Option<ClusterSource>,
) -> Result<()> {
    let workers = threads.workers;
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
    let (control, mut requests) = Control::new(filter.table());
    let ops_config = config.operations.clone();
    if let Some(listen) = ops_config.admin_listen {
        admin::start(listen, control.clone()).await?;
    }
    let _status_socket = StatusSocket::start(
        &ops_config.control_dir,
        &config.interface.name,
        control.clone(),
    )?;
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
    let about = Identity {
        name: config.name.clone(),
        interface: config.interface.name.clone(),
        listen: sockets[0].local_addr()?,
        threads,
        started_at: unix_now().as_secs(),
    };
    tracing::info!(
        node = %config.name,
        listen = %about.listen,
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
    let mut uapi = ops_config
        .uapi_dir
        .clone()
        .map(|dir| UapiSockets::new(dir, ops_config.uapi_private_key, control.clone()));
    if let Some(uapi) = &mut uapi {
        uapi.sync(&ops::uapi::socket_names(&config.interface.name, identities));
    }
    control.set_ready(true);
    systemd::ready(&format!(
        "{identities} identities, {peer_identities} peer identities"
    ));
    let mut watchdog = systemd::watchdog_interval().map(tokio::time::interval);

    let mut reloader = Reloader::new(config);
    if let Some(source) = &mut cluster {
        // The node runs the first composition: publish its MeshNode.
        source.applied();
    }
    let mut transmits = Vec::new();
    // When a change of the cluster's objects is to be applied.
    let mut cluster_due: Option<tokio::time::Instant> = None;
    let outcome = loop {
        // With several workers this loop has the main thread to itself.
        scheduling::keep_within_share();
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
            // A thread at normal priority that went quiet is raised from here.
            _ = sleep_until_some(scheduling::next_measurement()) => {}
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
            Some(request) = requests.recv() => {
                answer(request, &about, &shared, &reloader, cluster.as_ref());
            }
            _ = hangup.recv() => {
                match &mut cluster {
                    Some(source) => apply_cluster(source, &mut reloader, &shared, &mut filter, "SIGHUP"),
                    None => reloader.reload(&shared, &mut filter, "SIGHUP"),
                }
                sync_uapi(&mut uapi, &about, &shared);
            }
            // The node file is not watched in Kubernetes mode: the cluster says.
            _ = watch.tick(), if cluster.is_none() => {
                if reloader.poll(&shared, &mut filter) {
                    sync_uapi(&mut uapi, &about, &shared);
                }
            }
            // A change of the cluster's objects is applied a moment later, with whatever
            // else changed meanwhile.
            _ = cluster_changed(cluster.as_ref()), if cluster_due.is_none() => {
                cluster_due = Some(tokio::time::Instant::now() + cluster::SETTLE_TIME);
            }
            _ = sleep_until_due(cluster_due) => {
                cluster_due = None;
                if let Some(source) = &mut cluster {
                    apply_cluster(source, &mut reloader, &shared, &mut filter, "cluster changed");
                    sync_uapi(&mut uapi, &about, &shared);
                }
            }
            Some(_) = tick(&mut watchdog) => {
                // The node's lock is free and every worker still runs (one that stopped
                // ends this loop).
                drop(shared.lock());
                systemd::watchdog_ping();
            }
        }
        worker::send_transmits(&control_socket, &shared.send_errors, &mut transmits).await;
    };
    systemd::stopping();
    control.set_ready(false);
    if let Some(uapi) = &mut uapi {
        uapi.close();
    }
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

/// Returns when the cluster changed; never, without a cluster.
async fn cluster_changed(cluster: Option<&ClusterSource>) {
    match cluster {
        Some(source) => source.changed().await,
        None => std::future::pending().await,
    }
}

/// Returns at `due`; never, without one.
async fn sleep_until_due(due: Option<tokio::time::Instant>) {
    match due {
        Some(due) => tokio::time::sleep_until(due).await,
        None => std::future::pending().await,
    }
}

/// Applies what the cluster's objects make now, or refuses it as a broken file is.
fn apply_cluster(
    source: &mut ClusterSource,
    reloader: &mut Reloader,
    shared: &Shared,
    filter: &mut PlaintextFilter,
    why: &str,
) {
    let started = Instant::now();
    match source.compose() {
        Ok((config, policy)) => {
            if reloader.apply(config, &policy, shared, filter, why, started) {
                source.applied();
            }
        }
        Err(error) => reloader.refuse(why, &error),
    }
}

/// The next tick of an optional interval; never, without one.
async fn tick(interval: &mut Option<tokio::time::Interval>) -> Option<()> {
    match interval {
        Some(interval) => {
            interval.tick().await;
            Some(())
        }
        None => std::future::pending().await,
    }
}

/// After a reload: one userspace API socket per local identity, as there are now.
fn sync_uapi(uapi: &mut Option<UapiSockets>, about: &Identity, shared: &Shared) {
    if let Some(uapi) = uapi {
        let identities = shared.lock().node.locals().len();
        uapi.sync(&ops::uapi::socket_names(&about.interface, identities));
    }
}
