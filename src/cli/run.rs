//! The long-running commands: `run` (every source) and `project` (every projection,
//! or one rebuild), each under one supervisor with metrics.

use super::*;

pub(super) async fn run_sources(cfg: Config) -> Outcome {
    let root = CancellationToken::new();
    let page = status_page(&cfg, cfg.sources.clone(), cfg.projections.clone());
    let tel = match start_metrics(&cfg, &root, cfg.metrics.as_ref().map(|m| m.listen), page) {
        Ok(t) => t,
        Err(f) => return Err(f),
    };
    let mut sources = JoinSet::new();
    for source in cfg.sources {
        let name = source.name.clone();
        let token = root.child_token();
        let nats = cfg.nats.clone();
        let tel = tel.clone();
        sources.spawn(async move { (name, source::run_source(source, nats, token, tel).await) });
    }
    let code = supervise(&mut sources, &root, "source").await;
    if code.is_ok() {
        info!("all sources stopped");
    }
    code
}

/// What the status page of this process shows: `sources` with `projections`, and
/// this process's own readiness of each source it runs. The telemetry is filled in
/// once it exists.
pub(super) struct StatusPage {
    sources: Vec<config::SourceConfig>,
    projections: Vec<config::ProjectionConfig>,
    nats: config::NatsConfig,
    /// Whether this process runs the sources (then their readiness is shown).
    runs_sources: bool,
    /// For `project`: the config `GET /wait` answers from.
    wait: Option<std::sync::Arc<Config>>,
}

pub(super) fn status_page(
    cfg: &Config,
    sources: Vec<config::SourceConfig>,
    projections: Vec<config::ProjectionConfig>,
) -> StatusPage {
    StatusPage {
        sources,
        projections,
        nats: cfg.nats.clone(),
        runs_sources: true,
        wait: None,
    }
}

impl StatusPage {
    fn pages(self, tel: std::sync::Arc<crate::telemetry::Telemetry>) -> crate::telemetry::Pages {
        let wait: Option<crate::telemetry::WaitFn> = self.wait.clone().map(|cfg| {
            let f: crate::telemetry::WaitFn = std::sync::Arc::new(move |query: String| {
                let cfg = cfg.clone();
                Box::pin(async move { super::status::http_wait(&cfg, &query).await })
            });
            f
        });
        crate::telemetry::Pages {
            status: self.gather(tel),
            wait,
        }
    }

    fn gather(
        self,
        tel: std::sync::Arc<crate::telemetry::Telemetry>,
    ) -> crate::telemetry::StatusFn {
        // One probe for the page's life: the page reads every second, over kept
        // connections.
        let probe = std::sync::Arc::new(crate::status::Probe::new(&self.nats));
        let page = std::sync::Arc::new(self);
        std::sync::Arc::new(move || {
            let page = page.clone();
            let probe = probe.clone();
            let tel = tel.clone();
            Box::pin(async move {
                let all = probe.all_sources(&page.sources, &page.projections).await;
                crate::status::to_json(&all, |s| page.runs_sources.then(|| tel.source_readiness(s)))
            })
        })
    }
}

/// The metrics of this process, served on `[metrics] listen` when configured, with
/// the status page.
pub(super) fn start_metrics(
    cfg: &Config,
    root: &CancellationToken,
    listen: Option<std::net::SocketAddr>,
    page: StatusPage,
) -> Result<std::sync::Arc<crate::telemetry::Telemetry>, Failure> {
    let tel = crate::telemetry::Telemetry::new(
        cfg.metrics
            .as_ref()
            .map_or(Duration::from_secs(60), |m| m.ready_max_lag),
    );
    if let Some(addr) = listen {
        // Bind first, so a taken port is an error at start rather than in silence.
        match std::net::TcpListener::bind(addr) {
            Ok(l) => drop(l),
            Err(e) => {
                return Err(Failure::Failed(format!(
                    "cannot serve metrics on {addr}: {e}"
                )));
            }
        }
        let (tel, token) = (tel.clone(), root.child_token());
        let pages = page.pages(tel.clone());
        info!(url = %page_url(addr), "status page");
        tokio::spawn(async move {
            if let Err(e) = crate::telemetry::serve(addr, tel, Some(pages), token).await {
                error!(error = %e, address = %addr, "metrics endpoint failed");
            }
        });
    }
    Ok(tel)
}

/// Waits for every task, cancelling `root` on SIGTERM or SIGINT (each task then
/// drains). Exit code 1 when a task ended in an error (logged with its name) or
/// panicked.
pub(super) async fn supervise<E: std::error::Error + 'static>(
    tasks: &mut JoinSet<(String, Result<(), E>)>,
    root: &CancellationToken,
    what: &str,
) -> Outcome {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(err) => {
            return Err(Failure::Failed(format!("cannot listen for SIGTERM: {err}")));
        }
    };
    let mut failed = false;
    loop {
        tokio::select! {
            biased;
            _ = term.recv(), if !root.is_cancelled() => {
                info!("SIGTERM received; draining");
                root.cancel();
            }
            _ = tokio::signal::ctrl_c(), if !root.is_cancelled() => {
                info!("SIGINT received; draining");
                root.cancel();
            }
            joined = tasks.join_next() => match joined {
                None => break,
                Some(Ok((_, Ok(())))) => {}
                Some(Ok((name, Err(err)))) => {
                    error!(name = %name, error = %ErrorChain(&err), "{what} stopped");
                    failed = true;
                }
                Some(Err(join_err)) => {
                    error!(error = %join_err, "a {what} task panicked");
                    failed = true;
                }
            },
        }
    }
    if failed {
        Err(Failure::Reported)
    } else {
        Ok(())
    }
}

pub(super) async fn project(cfg: Config, names: Vec<String>) -> Outcome {
    let chosen: Vec<_> = cfg
        .projections
        .iter()
        .filter(|p| names.is_empty() || names.contains(&p.name))
        .cloned()
        .collect();
    for n in &names {
        if !cfg.projections.iter().any(|p| &p.name == n) {
            return Err(Failure::Usage(format!("no [[projection]] is named {n:?}")));
        }
    }
    if chosen.is_empty() {
        return Err(Failure::Usage(
            "the config has no [[projection]]".to_string(),
        ));
    }
    let root = CancellationToken::new();
    // The page shows the sources these projections read, with only them.
    let sources = cfg
        .sources
        .iter()
        .filter(|s| chosen.iter().any(|p| p.source == s.name))
        .cloned()
        .collect();
    let mut page = status_page(&cfg, sources, chosen.clone());
    page.runs_sources = false;
    page.wait = Some(std::sync::Arc::new(cfg.clone()));
    let tel = match start_metrics(
        &cfg,
        &root,
        cfg.metrics.as_ref().and_then(|m| m.project_listen),
        page,
    ) {
        Ok(t) => t,
        Err(f) => return Err(f),
    };
    let mut tasks = JoinSet::new();
    for p in chosen {
        let name = p.name.clone();
        let token = root.child_token();
        let tel = tel.clone();
        let nats = cfg.nats.clone();
        tasks.spawn(async move {
            (
                name,
                crate::projection::run_projection(p, nats, token, tel).await,
            )
        });
    }
    supervise(&mut tasks, &root, "projection").await
}

pub(super) async fn rebuild(cfg: Config, name: &str) -> Outcome {
    use std::io::IsTerminal;
    let Some(p) = cfg.projections.iter().find(|p| p.name == name) else {
        return Err(Failure::Usage(format!(
            "no [[projection]] is named {name:?}"
        )));
    };
    let bar = std::io::stderr().is_terminal().then(|| {
        let bar = indicatif::ProgressBar::new(0);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "rebuilding {msg} [{bar:30}] {human_pos}/{human_len} events, {per_sec}, ETA {eta}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        bar.set_message(name.to_string());
        bar
    });
    let started = std::time::Instant::now();
    let result = crate::projection::rebuild(p, &cfg.nats, |done, total| {
        if let Some(bar) = &bar {
            bar.set_length(total);
            bar.set_position(done);
        }
    })
    .await;
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }
    match result {
        Ok(stats) => {
            eprintln!(
                "rebuilt {name}: {} events applied up to stream sequence {}, swapped in {} ms ({} ms in all)",
                stats.events,
                stats.seq,
                stats.swap_ms,
                started.elapsed().as_millis()
            );
            Ok(())
        }
        Err(e) => Err(Failure::of(&e)),
    }
}

/// The status page's address as a person types it (127.0.0.1 for all addresses).
fn page_url(mut addr: std::net::SocketAddr) -> String {
    if addr.ip().is_unspecified() {
        addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    format!("http://{addr}/")
}
