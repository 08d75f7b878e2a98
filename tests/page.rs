//! The status page in a real browser (headless Chromium from the Debian packages):
//! the page `run` serves on its metrics listener, and the one `project` serves,
//! against real Postgres and nats-server. The test reads what the page drew (the DOM
//! after its script ran) and looks at screenshots' pixels.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use support::*;

fn chromium() -> PathBuf {
    for p in ["/usr/bin/chromium", "/usr/bin/chromium-browser"] {
        if Path::new(p).exists() {
            return PathBuf::from(p);
        }
    }
    panic!("chromium not found: run scripts/install-deps.sh (apt-get install chromium)");
}

/// A headless Chromium run over `url` with `args`, its profile in a fresh temp dir;
/// the page's script runs for 3 s of virtual time (three refreshes).
fn browse(url: &str, args: &[&str]) -> String {
    let profile = tempfile::tempdir().unwrap();
    let out = Command::new(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--hide-scrollbars",
            "--virtual-time-budget=3000",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(args)
        .arg(url)
        .output()
        .expect("run chromium");
    assert!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The page's DOM once its script has drawn it.
fn dom(url: &str) -> String {
    browse(url, &["--dump-dom"])
}

/// A screenshot of the page into `path`, decoded: (width, height, RGBA pixels).
fn screenshot(url: &str, path: &Path) -> (u32, u32, Vec<u8>) {
    browse(
        url,
        &[
            &format!("--screenshot={}", path.display()),
            "--window-size=1400,900",
        ],
    );
    let decoder = png::Decoder::new(std::fs::File::open(path).expect("screenshot written"));
    let mut reader = decoder.read_info().expect("a PNG");
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).expect("PNG frame");
    buf.truncate(info.buffer_size());
    // Kept for a person to look at (the README's picture comes from here).
    if let Ok(keep) = std::env::var("TIDEMARK_SCREENSHOTS") {
        let _ = std::fs::copy(path, Path::new(&keep).join(path.file_name().unwrap()));
    }
    let rgba = match info.color_type {
        png::ColorType::Rgba => buf,
        png::ColorType::Rgb => buf
            .chunks(3)
            .flat_map(|p| [p[0], p[1], p[2], 255])
            .collect(),
        other => panic!("unexpected PNG colour type {other:?}"),
    };
    (info.width, info.height, rgba)
}

/// Pixels of exactly the colour `rgb` (the page's red #d62828, green #2a9d8f).
fn count_colour(rgba: &[u8], rgb: [u8; 3]) -> usize {
    rgba.chunks(4)
        .filter(|p| p[0] == rgb[0] && p[1] == rgb[1] && p[2] == rgb[2])
        .count()
}

const RED: [u8; 3] = [0xd6, 0x28, 0x28];
const GREEN: [u8; 3] = [0x2a, 0x9d, 0x8f];

/// The opening tag of the element with `data-link="name"` (or another `attr`).
fn element<'a>(dom: &'a str, attr: &str, name: &str) -> Option<&'a str> {
    let at = dom.find(&format!("{attr}=\"{name}\""))?;
    let start = dom[..at].rfind('<')?;
    let end = at + dom[at..].find('>')?;
    Some(&dom[start..=end])
}

/// An attribute's value in an opening tag.
fn attr<'a>(tag: &'a str, name: &str) -> Option<&'a str> {
    let at = tag.find(&format!(" {name}=\""))? + name.len() + 3;
    let len = tag[at..].find('"')?;
    Some(&tag[at..at + len])
}

/// Loads the page until `check` passes on its DOM, or panics with the last DOM.
fn wait_page(url: &str, what: &str, timeout: Duration, check: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let d = dom(url);
        if check(&d) {
            return d;
        }
        assert!(
            Instant::now() < deadline,
            "the page never showed {what}; last DOM:\n{d}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_draws_the_chain_in_a_real_browser() {
    let Rig {
        pg,
        mut nats,
        dir,
        db,
    } = Rig::start().await;
    db.batch_execute(
        "CREATE TABLE t (id int PRIMARY KEY, n int);
         CREATE TABLE big (id int PRIMARY KEY, v text);
         INSERT INTO big SELECT g, md5(g::text) FROM generate_series(1, 30000) g;",
    )
    .await
    .unwrap();
    let rm = pg.create_db("readmodel").await;
    rm.batch_execute(
        "CREATE TABLE counter (id int PRIMARY KEY, n int); INSERT INTO counter VALUES (1, 0);",
    )
    .await
    .unwrap();
    let (run_port, project_port) = (free_port(), free_port());
    let sections = format!(
        r#"
[metrics]
listen = "127.0.0.1:{run_port}"
project_listen = "127.0.0.1:{project_port}"

[[projection]]
name = "counter"
source = "store"

[projection.postgres]
host = "127.0.0.1"
port = {pg_port}
dbname = "readmodel"
user = "postgres"

[[projection.on]]
type = "t.created"
sql = "UPDATE counter SET n = n + 1 WHERE id = 1"
params = []
"#,
        pg_port = pg.port
    );
    let cfg = write_config(
        dir.path(),
        &pg,
        &nats,
        &SourceSpec::new("store", "store")
            .tables(&["t", "big"])
            .sections(&sections),
    );
    let mut tm = Tidemark::run(&cfg, &dir.path().join("run.log"));
    tm.wait_streaming();
    assert!(
        tm.log().contains(&format!("http://127.0.0.1:{run_port}/")),
        "run logs the page's address:\n{}",
        tm.log()
    );
    // `status --watch` redraws the text chain every second.
    let watch = Command::new(Tidemark::bin())
        .args(["status", "--watch", "--config", cfg.to_str().unwrap()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(5000));
    unsafe { libc::kill(watch.id() as i32, libc::SIGINT) };
    let out = watch.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "Ctrl-C ends it cleanly: {text}");
    let frames = text.matches("\x1b[2J").count();
    assert!((2..=8).contains(&frames), "{frames} redraws in 5 s: {text}");
    assert!(
        text.contains("source store") && text.contains("slot      confirmed flush"),
        "{text}"
    );
    let run_url = format!("http://127.0.0.1:{run_port}/");
    let project_url = format!("http://127.0.0.1:{project_port}/");

    // The projection applies a first batch, then stops while more is written.
    let mut pj = Tidemark::project(&cfg, &dir.path().join("project.log"));
    db.batch_execute("INSERT INTO t SELECT g, g FROM generate_series(1, 10) g")
        .await
        .unwrap();
    wait_until("the first 10 applied", Duration::from_secs(60), || {
        let rm = &rm;
        async move {
            rm.query_one("SELECT n FROM counter", &[])
                .await
                .map(|r| r.get::<_, i32>(0) == 10)
                .unwrap_or(false)
        }
    })
    .await;
    // The project page shows its projection.
    let d = wait_page(
        &project_url,
        "the projection on the project page",
        Duration::from_secs(30),
        |d| {
            element(d, "data-link", "projection:counter")
                .is_some_and(|e| attr(e, "data-seq") == Some("10"))
        },
    );
    assert!(element(&d, "data-link", "stream").is_some(), "{d}");
    assert!(pj.terminate(Duration::from_secs(20)).success());

    db.batch_execute("INSERT INTO t SELECT g, g FROM generate_series(11, 2010) g")
        .await
        .unwrap();
    let nc = nats.client().await;
    wait_stream_count(&nc, "STORE", 2010, Duration::from_secs(60), || tm.log()).await;
    // Each link's position, and the projection 2,000 events behind.
    let d = wait_page(
        &run_url,
        "the projection 2000 behind",
        Duration::from_secs(30),
        |d| {
            element(d, "data-link", "projection:counter")
                .is_some_and(|e| attr(e, "data-lag-events") == Some("2000"))
        },
    );
    let wal = element(&d, "data-link", "wal").expect("the WAL link");
    let slot = element(&d, "data-link", "slot").expect("the slot link");
    let stream = element(&d, "data-link", "stream").expect("the stream link");
    let projection = element(&d, "data-link", "projection:counter").unwrap();
    for (name, e) in [("wal", wal), ("slot", slot), ("stream", stream)] {
        assert_eq!(attr(e, "data-state"), Some("ok"), "{name}: {d}");
        let lsn: tidemark::position::Lsn = attr(e, "data-lsn")
            .unwrap_or_else(|| panic!("{name} has an LSN: {d}"))
            .parse()
            .unwrap();
        assert!(lsn.0 > 0, "{name}");
    }
    assert_eq!(attr(stream, "data-seq"), Some("2010"), "{d}");
    assert_eq!(attr(projection, "data-seq"), Some("10"), "{d}");
    assert!(d.contains("applied seq 10"), "{d}");
    let shot = dir.path().join("status-behind.png");
    let (w, h, px) = screenshot(&run_url, &shot);
    println!("screenshot (projection behind): {}", shot.display());
    assert_eq!((w, h), (1400, 900));
    assert!(
        count_colour(&px, GREEN) > 2_000,
        "the links are drawn green"
    );
    assert_eq!(
        count_colour(&px, RED),
        0,
        "nothing is red while all is well"
    );

    // The lag drains to zero once the projection runs again.
    let mut pj = Tidemark::project(&cfg, &dir.path().join("project.log"));
    wait_page(
        &run_url,
        "the projection caught up",
        Duration::from_secs(60),
        |d| {
            element(d, "data-link", "projection:counter").is_some_and(|e| {
                attr(e, "data-lag-events") == Some("0") && attr(e, "data-seq") == Some("2010")
            })
        },
    );

    // Read-your-writes over HTTP on the project listener: 200 once the read model
    // includes a position, 408 when it does not in time, 404 for an unknown
    // projection, 400 for a bad query.
    db.batch_execute("INSERT INTO t VALUES (5001, 1)")
        .await
        .unwrap();
    let written = current_lsn(&db).await;
    let (code, body) = http_get(
        project_port,
        &format!("/wait?projection=counter&lsn={written}&timeout=10s"),
    )
    .await;
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let applied: tidemark::position::Lsn = v["applied_lsn"].as_str().unwrap().parse().unwrap();
    assert!(applied >= written, "{body}");
    let n: i32 = rm
        .query_one("SELECT n FROM counter", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 2011, "a 200 means the write is in the read model");
    let encoded = written.to_string().replace('/', "%2F");
    let (code, _) = http_get(
        project_port,
        &format!("/wait?projection=counter&lsn={encoded}&timeout=2s"),
    )
    .await;
    assert_eq!(code, 200, "an encoded slash works too");
    let (code, body) = http_get(
        project_port,
        "/wait?projection=counter&lsn=FFFFFFFF/0&timeout=1s",
    )
    .await;
    assert_eq!(code, 408, "{body}");
    assert!(body.contains("did not reach"), "{body}");
    let (code, body) = http_get(project_port, "/wait?projection=nope&lsn=0/1").await;
    assert_eq!(code, 404, "{body}");
    let (code, body) = http_get(project_port, "/wait?projection=counter&lsn=banana").await;
    assert_eq!(code, 400, "{body}");
    let (code, _) = http_get(run_port, "/wait?projection=counter&lsn=0/1").await;
    assert_eq!(code, 404, "run serves no /wait: it applies no projection");

    // A backfill's progress: a bar that fills.
    let (code, out, err) = tidemark_cmd(&[
        "backfill",
        "--config",
        cfg.to_str().unwrap(),
        "--table",
        "big",
        "--chunk-size",
        "200",
        "--no-wait",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    let d = wait_page(
        &run_url,
        "the backfill done",
        Duration::from_secs(120),
        |d| {
            let Some(e) = element(d, "data-backfill", "public.big") else {
                return false;
            };
            if attr(e, "data-state") == Some("running") {
                let pct: u32 = attr(e, "data-pct")
                    .and_then(|p| p.parse().ok())
                    .unwrap_or(0);
                if pct > 0 && pct < 100 {
                    println!("backfill seen at {pct}%");
                }
            }
            attr(e, "data-state") == Some("done")
        },
    );
    let bar = element(&d, "data-backfill", "public.big").unwrap();
    assert_eq!(attr(bar, "data-pct"), Some("100"), "{d}");
    assert_eq!(attr(bar, "data-rows-done"), Some("30000"), "{d}");
    assert!(d.contains("width: 100%"), "the bar is full: {d}");

    // NATS stopped: the stream link is red, with the reason; the screenshot shows red.
    nats.stop();
    let d = wait_page(
        &run_url,
        "a red stream link",
        Duration::from_secs(30),
        |d| element(d, "data-link", "stream").is_some_and(|e| attr(e, "data-state") == Some("bad")),
    );
    assert!(d.contains("unavailable:"), "the reason is shown: {d}");
    assert!(d.contains("needs attention"), "{d}");
    let shot = dir.path().join("status-nats-down.png");
    let (_, _, px) = screenshot(&run_url, &shot);
    println!("screenshot (nats-server stopped): {}", shot.display());
    assert!(count_colour(&px, RED) > 2_000, "the failing link is red");
    nats.start_again();
    wait_page(
        &run_url,
        "the stream link green again",
        Duration::from_secs(60),
        |d| element(d, "data-link", "stream").is_some_and(|e| attr(e, "data-state") == Some("ok")),
    );

    // Read-only, and no row values: the data it reads holds positions, not rows.
    let (code, json) = http_get(run_port, "/status.json").await;
    assert_eq!(code, 200);
    assert!(
        !json.contains("md5") && !json.contains("password"),
        "{json}"
    );
    assert!(pj.terminate(Duration::from_secs(20)).success());
    assert!(tm.terminate(Duration::from_secs(20)).success());
}
