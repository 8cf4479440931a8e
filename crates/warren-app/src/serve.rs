//! `serve` and `node`: the runtime, the node with the app's modules, the web page, and the
//! signals (SIGINT/SIGTERM drain and stop, SIGHUP reloads the config's reloadable settings and
//! every plugin).

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use warren::Node;
use warren::config::{Config, ModuleConfig};

use crate::advertise::{Advertised, Advertising};
use crate::cli::ServeArgs;
use crate::load::resolve_config;
use crate::logging::{self, LogControl};
use crate::plugins::Plugins;
use crate::{App, Role, admin, plugin_host, web};

/// Run `serve` or `node` with these arguments until a signal stops the node.
pub(crate) fn run(app: &App, role: Role, args: ServeArgs) -> ExitCode {
    let config = match resolve_config(app, role, &args) {
        Ok(c) => c,
        Err(e) => {
            // one line per mistake, each with the prefix
            for line in format!("{e:#}").lines() {
                eprintln!("error: {line}");
            }
            return ExitCode::FAILURE;
        }
    };
    // the log's format and filter are the config's: installed once it is read
    let log = match logging::init(&config.log, args.log_format, &config.node.id) {
        Ok(log) => log,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    // before anything resolves a metric handle (docs/metrics.md)
    crate::metrics::install(&config.metrics);
    // one thread: the current-thread scheduler, which runs woken tasks in the order they woke,
    // so a writer woken by the first of many queued frames runs after the rest were queued
    let mut builder = match config.node.threads {
        1 => tokio::runtime::Builder::new_current_thread(),
        0 => tokio::runtime::Builder::new_multi_thread(),
        n => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n);
            b
        }
    };
    raise_nofile(&config);
    let rt = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let served = rt.block_on(serve(app, config, log.clone(), || {
        resolve_config(app, role, &args)
    }));
    log.flush();
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Descriptors kept for what is not a client connection (log, registry, bus, web page…) when
/// checking that the listeners' `max_conn` fit under the open file limit.
const NOFILE_MARGIN: u64 = 256;

/// Raise the soft open-file limit to the hard one (each connection is a descriptor; a soft
/// limit of 1024 would stop every listener after a thousand clients), and warn when the
/// listeners' `max_conn` together cannot fit under it.
fn raise_nofile(config: &Config) {
    let before = rlimit::getrlimit(rlimit::Resource::NOFILE).ok();
    let limit = match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) => n,
        Err(e) => {
            tracing::warn!(error = %e, "cannot raise the open file limit");
            match before {
                Some((soft, _)) => soft,
                None => return,
            }
        }
    };
    tracing::info!(
        soft_before = before.map_or(0, |b| b.0),
        hard = before.map_or(limit, |b| b.1),
        nofile = limit,
        "open file limit"
    );
    let conns: u64 = config.listeners.iter().map(|l| l.max_conn as u64).sum();
    if conns + NOFILE_MARGIN > limit {
        tracing::warn!(
            nofile = limit,
            max_conn_total = conns,
            "the listeners' max_conn together ({conns}) plus {NOFILE_MARGIN} exceed the open file \
             limit ({limit}): past it, accepts fail; raise the hard limit (ulimit -Hn, LimitNOFILE=) \
             or lower max_conn"
        );
    }
}

/// Run the node `config` describes until SIGINT/SIGTERM; on SIGHUP, `reload` reads the config
/// again and the node takes its IP lists, TLS certificates, topic ACL and `[auth]` checks, and
/// every plugin is reloaded from its file.
async fn serve(
    app: &App,
    config: Config,
    log: LogControl,
    reload: impl Fn() -> anyhow::Result<Config>,
) -> anyhow::Result<()> {
    if config.listeners.is_empty() {
        tracing::warn!("no listeners configured: clients cannot connect");
    }

    let transport = warren_cluster::connect::transport(&config.bus).await?;
    let registry = warren_cluster::connect::registry(&config.registry, &config.bus)
        .await?
        .map(|r| Advertising::new(r, Advertised::from_config(&config)));
    // an instance runs here unless it is a peer's (a remote type, another process group) or
    // names another node; a peer's mqant AMQP instance is reached through RabbitMQ
    let health = crate::metrics::Health::start(
        &config.metrics,
        transport.clone(),
        registry
            .clone()
            .map(|r| r as Arc<dyn warren::registry::Registry>),
    );
    let here = config.clone();
    let runs_here = move |m: &ModuleConfig| here.runs_here(m);
    let mut builder = Node::builder(config.clone());
    for setup in &app.setup {
        builder = setup(builder);
    }
    if let Some(t) = transport {
        builder = builder.transport(t);
    }
    if let Some(r) = &registry {
        builder = builder.registry(r.clone());
    }
    if let Some(shared) = warren_cluster::connect::shared_retained(&config).await {
        builder = builder.shared_retained(shared);
    }
    let plugins = Arc::new(Plugins::new());
    builder = plugin_host::listeners(&config, builder, &plugins)?;
    for m in config.modules.iter().filter(|m| runs_here(m)) {
        let module = match plugin_host::module(m, &config, &plugins)? {
            Some(plugin) => plugin,
            None => app
                .build_module(m)
                .map_err(|e| anyhow::anyhow!("module {}: {e}", m.kind))?,
        };
        builder = builder.module(module, m.clone());
    }
    // `[[proxy]]` routes served by backend groups, `[[rpc_route]]` handlers served by TianQinS
    // functions (docs/backends.md, docs/cluster.md): modules of their own, built from config
    let proxies = warren_cluster::proxy::Proxies::start(
        &config.proxies,
        &config.backends,
        &config.registry.effective_url(&config.bus),
    )
    .map_err(anyhow::Error::msg)?;
    let rpc_routes = warren_cluster::rpc_route::RpcRoutes::build(&config.rpc_routes);
    for module in proxies.modules().iter().chain(rpc_routes.modules()) {
        let entry: ModuleConfig = toml::from_str(&format!("type = {:?}", module.name()))
            .context("a config-built module's entry")?;
        builder = builder.module(module.clone(), entry);
    }
    let node = builder.start().await?;
    health.set_node(node.handle().clone());
    proxies.attach(node.handle().session_table());
    if let Some(r) = &registry
        && let Err(e) = r
            .bound(node.listeners().first().map(|l| l.local_addr))
            .await
    {
        tracing::warn!(error = %e, "cannot announce the bound port in the registry");
    }
    let watcher = plugin_host::watch(&config, &plugins);
    let hangups = Arc::new(Notify::new());
    let plugin_reloader = (!plugins.is_empty())
        .then(|| tokio::spawn(reload_plugins(plugins.clone(), hangups.clone())));
    let stop_http = CancellationToken::new();
    crate::metrics::spawn_upkeep(stop_http.clone());
    let bridges = warren_cluster::connect::bridges(&config, node.handle(), &runs_here).await?;
    if let Some(rpc) = bridges.redis_rpc.first() {
        plugins.connect_redis_rpc(rpc);
        rpc_routes.attach(rpc);
    }
    // `[[backend]]` groups (docs/backends.md): dialled in the background, connections logged
    // a proxied group runs with the proxy's hooks (above), not here
    let proxied = warren_cluster::proxy::Proxies::proxied_groups(&config.proxies);
    let plain: Vec<_> = config
        .backends
        .iter()
        .filter(|b| !proxied.contains(&b.group_name()))
        .cloned()
        .collect();
    let backends = warren_cluster::backend::ConfiguredBackends::start_with_registry(
        &plain,
        &config.registry.effective_url(&config.bus),
    )
    .map_err(anyhow::Error::msg)?;
    let backends = Arc::new(backends);
    // module plugins send to and call them, and hear what they push (docs/plugins.md)
    crate::backend_plugins::connect(&plugins, &backends);
    // what /admin/config shows: the start config, then what each SIGHUP reloads
    let in_force = Arc::new(admin::ConfigInForce::new(config.clone()));
    let admin = admin::serve(
        &config,
        in_force.clone(),
        plugins.clone(),
        node.handle().clone(),
        log,
        stop_http.clone(),
    )
    .await?;

    let http = match &app.web_page {
        Some(page) if config.http.enabled => {
            let router = crate::metrics::with_page(page(node.listeners()));
            let bound = web::serve(&config.http.addr, router, stop_http.clone())
                .await
                .with_context(|| format!("cannot serve the web page on {}", config.http.addr))?;
            Some(bound)
        }
        _ => None,
    };

    health.set_bound();
    println!(
        "{} {} node {:?} ready (bus {}, registry {})",
        app.name,
        app.version,
        config.node.id,
        if config.bus.is_local() {
            "local"
        } else {
            &config.bus.url
        },
        config.registry.effective_url(&config.bus),
    );
    for l in node.listeners() {
        println!("listening {}", l.describe());
    }
    if let Some((addr, _)) = &http {
        println!("web page http://{addr}/");
    }
    if let Some((addr, _)) = &admin {
        println!("admin http://{addr}/");
    }

    wait_for_signal(|| {
        // the plugins first: their files are theirs, whatever the config file says now
        hangups.notify_one();
        reload_config(&node, &reload, &in_force);
    })
    .await;
    tracing::info!("shutdown requested");
    health.set_draining();
    if let Some(task) = plugin_reloader {
        task.abort();
    }
    drop(watcher);
    bridges.stop();
    backends.shutdown().await;
    node.shutdown().await;
    // after the drain: /readyz answers "draining" to load balancers while it lasts
    stop_http.cancel();
    // after the gate's drain: requests still in flight keep their backend until they end
    proxies.shutdown().await;
    if let Some((_, task)) = http {
        let _ = task.await;
    }
    if let Some((_, task)) = admin {
        let _ = task.await;
    }
    Ok(())
}

/// SIGHUP's plugin half: reload every plugin each time `hangups` is notified, logging each
/// result (a plugin whose file does not load keeps its running version). One task does it, so
/// reloads never overlap; SIGHUPs that arrive during a round make one more round, not one each.
async fn reload_plugins(plugins: Arc<Plugins>, hangups: Arc<Notify>) {
    loop {
        hangups.notified().await;
        let done = plugins.reload_all("SIGHUP").await;
        if done.failed == 0 {
            tracing::info!(reloaded = done.reloaded, "SIGHUP: reloaded every plugin");
        } else {
            tracing::warn!(
                reloaded = done.reloaded,
                failed = done.failed,
                "SIGHUP: {} plugin(s) did not load and keep their running version",
                done.failed
            );
        }
    }
}

/// SIGHUP's config half: read the config again (its relative paths from the file's directory,
/// as at start), hand the node what it reloads, and record in `in_force` what is in force
/// now: the new settings when the node took them all, else the errors (`/admin/config`).
fn reload_config(
    node: &Node,
    reload: &impl Fn() -> anyhow::Result<Config>,
    in_force: &admin::ConfigInForce,
) {
    match reload() {
        Ok(new) => {
            let errors = node.reload(&new);
            if errors.is_empty() {
                tracing::info!(
                    "SIGHUP: reloaded the IP lists, TLS certificates, topic ACL and [auth] checks"
                );
                in_force.reloaded(&new);
            }
            for e in &errors {
                tracing::error!(error = %e, "SIGHUP: not reloaded; the old setting stays");
            }
            if !errors.is_empty() {
                in_force.failed(errors);
            }
        }
        Err(e) => {
            tracing::error!(
                error = format!("{e:#}"),
                "SIGHUP: the config does not load; its IP lists, TLS certificates, topic ACL and \
                 [auth] checks stay as they were"
            );
            in_force.failed(format!("{e:#}").lines().map(str::to_owned).collect());
        }
    }
}

/// Wait for SIGINT or SIGTERM, calling `on_hangup` for each SIGHUP meanwhile.
async fn wait_for_signal(on_hangup: impl Fn()) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match (
            signal(SignalKind::terminate()),
            signal(SignalKind::hangup()),
        ) {
            (Ok(mut term), Ok(mut hup)) => loop {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => break,
                    _ = term.recv() => break,
                    _ = hup.recv() => on_hangup(),
                }
            },
            _ => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = on_hangup;
        let _ = tokio::signal::ctrl_c().await;
    }
}
