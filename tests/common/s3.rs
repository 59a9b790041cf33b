//! Real S3 servers on loopback for the tests: Garage (the primary server: it checks SSE-C
//! keys and flexible checksums for real) and moto (versioning, KMS and TLS, which a single
//! Garage node does not do). Each test binary starts its own, once; they stop when the test
//! process exits. A missing server fails the test with how to get it, never a silent skip.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

#[derive(Clone)]
pub struct S3Server {
    pub name: &'static str,
    pub endpoint: String,
    pub region: String,
    pub access_key: String,
    pub secret_key: String,
    pub bucket: String,
    /// PEM of the CA that signed a TLS server's certificate.
    pub ca_pem: Option<PathBuf>,
    pub dir: PathBuf,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn random_hex(bytes: usize) -> String {
    let mut b = vec![0u8; bytes];
    getrandom::fill(&mut b).unwrap();
    hex::encode(b)
}

/// Runs `cmd` in the background until this test process exits (a watchdog shell kills it
/// then, so no server outlives the tests, and removes the server's directory, the parent
/// of `log`: a server's data must not pile up on the disk over test runs).
fn spawn_until_exit(cmd: &str, log: &Path) {
    let me = std::process::id();
    let script = format!(
        "{cmd} >>'{log}' 2>&1 & child=$!; \
         while kill -0 {me} 2>/dev/null && kill -0 $child 2>/dev/null; do sleep 0.5; done; \
         kill $child 2>/dev/null; sleep 1; kill -9 $child 2>/dev/null; \
         if ! kill -0 {me} 2>/dev/null; then rm -rf '{dir}'; fi",
        log = log.display(),
        dir = log.parent().expect("a log in a directory").display()
    );
    // `setsid -f` forks the watchdog into its own session and returns at once.
    let status = Command::new("setsid")
        .args(["-f", "sh", "-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("starting a server");
    assert!(status.success(), "setsid failed: {status}");
}

fn wait_for_port(port: u16, what: &str, log: &Path) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            panic!(
                "{what} did not start listening on port {port}; its log:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Where Garage is: on PATH or in cargo's bin directory.
pub fn garage_bin() -> PathBuf {
    let mut candidates: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("garage"))
                .collect()
        })
        .unwrap_or_default();
    if let Some(h) = std::env::var_os("CARGO_HOME") {
        candidates.push(PathBuf::from(h).join("bin/garage"));
    }
    if let Some(h) = std::env::var_os("HOME") {
        candidates.push(PathBuf::from(h).join(".cargo/bin/garage"));
    }
    candidates
        .into_iter()
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "Garage (the S3 server these tests run against) is not installed.\n\
             Install it with `cargo install garage --locked` (it builds in about 18 minutes);\n\
             scripts/test (the README's test command) installs it when it is missing."
            )
        })
}

fn garage_cli(bin: &Path, cfg: &Path, args: &[&str]) -> String {
    let out = Command::new(bin)
        .arg("-c")
        .arg(cfg)
        .args(args)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "garage {args:?} failed:\n{text}");
    text
}

fn start_garage() -> S3Server {
    let bin = garage_bin();
    let dir = std::env::temp_dir().join(format!("coffer-garage-{}", random_hex(6)));
    std::fs::create_dir_all(&dir).unwrap();
    let (s3, rpc, admin) = (free_port(), free_port(), free_port());
    let cfg = dir.join("garage.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"metadata_dir = "{d}/meta"
data_dir = "{d}/data"
db_engine = "lmdb"
replication_factor = 1
rpc_bind_addr = "127.0.0.1:{rpc}"
rpc_public_addr = "127.0.0.1:{rpc}"
rpc_secret = "{secret}"

[s3_api]
s3_region = "us-east-1"
api_bind_addr = "127.0.0.1:{s3}"
root_domain = ".s3.garage.localhost"

[admin]
api_bind_addr = "127.0.0.1:{admin}"
admin_token = "{token}"
"#,
            d = dir.display(),
            secret = random_hex(32),
            token = random_hex(16),
        ),
    )
    .unwrap();
    let log = dir.join("garage.log");
    spawn_until_exit(
        &format!("'{}' -c '{}' server", bin.display(), cfg.display()),
        &log,
    );
    wait_for_port(rpc, "garage", &log);
    wait_for_port(s3, "garage", &log);
    let node = garage_cli(&bin, &cfg, &["node", "id", "-q"]);
    let node = node.trim().split('@').next().unwrap().to_string();
    garage_cli(
        &bin,
        &cfg,
        &["layout", "assign", "-z", "dc1", "-c", "10G", &node],
    );
    garage_cli(&bin, &cfg, &["layout", "apply", "--version", "1"]);
    let access_key = format!("GK{}", random_hex(12));
    let secret_key = random_hex(32);
    let bucket = "coffer-test".to_string();
    // Right after the layout is applied the node may still refuse writes for a moment.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = Command::new(&bin)
            .arg("-c")
            .arg(&cfg)
            .args(["bucket", "create", &bucket])
            .output()
            .unwrap();
        if out.status.success() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "garage bucket create: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    garage_cli(
        &bin,
        &cfg,
        &[
            "key",
            "import",
            "--yes",
            "-n",
            "coffer",
            &access_key,
            &secret_key,
        ],
    );
    garage_cli(
        &bin,
        &cfg,
        &[
            "bucket", "allow", "--read", "--write", "--owner", &bucket, "--key", "coffer",
        ],
    );
    S3Server {
        name: "garage",
        endpoint: format!("http://127.0.0.1:{s3}"),
        region: "us-east-1".into(),
        access_key,
        secret_key,
        bucket,
        ca_pem: None,
        dir,
    }
}

/// The test process's Garage (started on first use).
pub fn garage() -> &'static S3Server {
    static G: OnceLock<S3Server> = OnceLock::new();
    G.get_or_init(start_garage)
}

fn python_has(module: &str) -> bool {
    Command::new("python3")
        .args(["-c", &format!("import {module}")])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

pub fn require_moto() {
    let has_server = Command::new("sh")
        .args(["-c", "command -v moto_server"])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        has_server && python_has("boto3") && python_has("flask"),
        "moto's S3 server is not installed: pip install 'moto[server]' (scripts/test does it)"
    );
}

/// Runs a Python snippet with boto3 pointed at `server` (`s3` is the client).
pub fn boto3(server: &S3Server, code: &str) -> String {
    let prelude = format!(
        "import boto3, botocore, sys\n\
         s3 = boto3.client('s3', endpoint_url='{ep}', region_name='{region}', \
         aws_access_key_id='{ak}', aws_secret_access_key='{sk}', verify={verify}, \
         config=botocore.config.Config(s3={{'addressing_style': 'path'}}, max_pool_connections=32))\n\
         bucket = '{bucket}'\n",
        ep = server.endpoint,
        region = server.region,
        ak = server.access_key,
        sk = server.secret_key,
        verify = server
            .ca_pem
            .as_ref()
            .map_or("True".to_string(), |p| format!("'{}'", p.display())),
        bucket = server.bucket,
    );
    let out = Command::new("python3")
        .args(["-c", &format!("{prelude}{code}")])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "boto3 script failed:\n{code}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

fn start_moto(tls: Option<(&Path, &Path, PathBuf)>) -> S3Server {
    require_moto();
    let dir = std::env::temp_dir().join(format!("coffer-moto-{}", random_hex(6)));
    std::fs::create_dir_all(&dir).unwrap();
    let port = free_port();
    let log = dir.join("moto.log");
    let mut cmd = format!("exec moto_server -H 127.0.0.1 -p {port}");
    if let Some((cert, key, _)) = &tls {
        cmd.push_str(&format!(" -c '{}' -k '{}'", cert.display(), key.display()));
    }
    spawn_until_exit(&cmd, &log);
    wait_for_port(port, "moto_server", &log);
    let scheme = if tls.is_some() { "https" } else { "http" };
    let server = S3Server {
        name: "moto",
        endpoint: format!("{scheme}://localhost:{port}"),
        region: "us-east-1".into(),
        access_key: "testing".into(),
        secret_key: "testing".into(),
        bucket: "coffer-versioned".into(),
        ca_pem: tls.map(|(_, _, ca)| ca),
        dir,
    };
    boto3(
        &server,
        "s3.create_bucket(Bucket=bucket)\n\
         s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={'Status': 'Enabled'})\n",
    );
    server
}

/// moto's S3 on plain HTTP, with a versioned bucket.
pub fn moto() -> &'static S3Server {
    static M: OnceLock<S3Server> = OnceLock::new();
    M.get_or_init(|| start_moto(None))
}

/// moto's S3 behind TLS with a certificate from a CA generated here (rcgen).
pub fn moto_tls() -> &'static S3Server {
    static M: OnceLock<S3Server> = OnceLock::new();
    M.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("coffer-ca-{}", random_hex(6)));
        std::fs::create_dir_all(&dir).unwrap();
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "coffer test CA");
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let params =
            rcgen::CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
                .unwrap();
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let cert = params.signed_by(&key, &issuer).unwrap();
        let (cert_path, key_path, ca_path) = (
            dir.join("server.pem"),
            dir.join("server.key"),
            dir.join("ca.pem"),
        );
        std::fs::write(&cert_path, cert.pem()).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        std::fs::write(&ca_path, ca.pem()).unwrap();
        start_moto(Some((&cert_path, &key_path, ca_path)))
    })
}

impl S3Server {
    /// Environment for a coffer process (credentials travel only here).
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ACCESS_KEY_ID", self.access_key.clone()),
            ("AWS_SECRET_ACCESS_KEY", self.secret_key.clone()),
            ("AWS_REGION", self.region.clone()),
            ("AWS_EC2_METADATA_DISABLED", "true".into()),
            // moto serves KMS on the same port (`--key aws-kms:...`); Garage has no KMS.
            (
                "AWS_ENDPOINT_URL_KMS",
                if self.name == "moto" {
                    self.endpoint.clone()
                } else {
                    "http://127.0.0.1:9".into()
                },
            ),
        ]
    }

    /// Command-line options of coffer for this server.
    pub fn args(&self) -> Vec<String> {
        let mut a = vec![
            "--endpoint-url".to_string(),
            self.endpoint.clone(),
            "--path-style".to_string(),
        ];
        if let Some(ca) = &self.ca_pem {
            a.push("--ca-bundle".into());
            a.push(ca.display().to_string());
        }
        a
    }

    /// `coffer init SOURCE` with this server's options and credentials.
    pub fn init(&self, source: &str, extra: &[&str]) -> String {
        let mut cmd = Command::new(crate::common::coffer_bin());
        cmd.arg("init").arg(source).args(self.args()).args(extra);
        self.run(cmd)
    }

    /// Runs a coffer command with this server's credentials; panics if it fails.
    pub fn run(&self, mut cmd: Command) -> String {
        for (k, v) in self.env() {
            cmd.env(k, v);
        }
        crate::common::run(&mut cmd)
    }

    /// A coffer command with this server's options and credentials, for tests that check
    /// failures themselves.
    pub fn coffer(&self, sub: &str, source: &str) -> Command {
        let mut cmd = Command::new(crate::common::coffer_bin());
        cmd.arg(sub).arg(source).args(self.args());
        for (k, v) in self.env() {
            cmd.env(k, v);
        }
        cmd
    }

    /// Mounts SOURCE at a fresh directory under `dir`.
    pub fn mount(&self, source: &str, dir: &Path, extra: &[&str]) -> crate::common::Mount {
        let mnt = dir.join(format!("mnt-{}", crate::common::rand_suffix()));
        std::fs::create_dir_all(&mnt).unwrap();
        let mut cmd = Command::new(crate::common::coffer_bin());
        cmd.arg("mount")
            .arg(source)
            .arg(&mnt)
            .args(self.args())
            .arg("--cache-dir")
            .arg(dir.join("cache"))
            .args(extra);
        for (k, v) in self.env() {
            cmd.env(k, v);
        }
        crate::common::Mount::start_cmd(cmd, &mnt)
    }

    /// A fresh `s3://bucket/prefix/` for one test.
    pub fn fresh_source(&self, name: &str) -> String {
        format!("s3://{}/{name}-{}", self.bucket, random_hex(4))
    }

    /// An in-process store on a fresh prefix.
    pub async fn store(&self, name: &str) -> coffer::store::s3::S3Store {
        use coffer::store::s3::{S3Location, S3Options, S3Store};
        let loc = S3Location::parse(&self.fresh_source(name)).unwrap();
        let opts = S3Options {
            endpoint_url: Some(self.endpoint.clone()),
            region: Some(self.region.clone()),
            path_style: true,
            ca_bundle: self.ca_pem.clone(),
            static_credentials: Some((self.access_key.clone(), self.secret_key.clone())),
            ..Default::default()
        };
        S3Store::connect(loc, &opts).await.unwrap()
    }
}

/// One node of a Garage cluster, which a test can stop and start again.
pub struct GarageNode {
    pub cfg: PathBuf,
    pub log: PathBuf,
    pub pidfile: PathBuf,
    pub s3: u16,
    pub rpc: u16,
}

impl GarageNode {
    pub fn start(&self) {
        let script = format!(
            "echo $$ > '{}'; exec '{}' -c '{}' server",
            self.pidfile.display(),
            garage_bin().display(),
            self.cfg.display(),
        );
        let _ = std::fs::remove_file(&self.pidfile);
        let runner = self.cfg.with_file_name("run.sh");
        std::fs::write(&runner, script).unwrap();
        spawn_until_exit(&format!("sh '{}'", runner.display()), &self.log);
        wait_for_port(self.rpc, "garage node", &self.log);
        wait_for_port(self.s3, "garage node", &self.log);
    }

    /// Kills the node (SIGKILL, as a crashed machine).
    pub fn kill(&self) {
        let pid: i32 = std::fs::read_to_string(&self.pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        // SAFETY: sending a signal to a server this test started.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.s3)).is_ok() {
            assert!(Instant::now() < deadline, "garage node did not stop");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

pub struct GarageCluster {
    pub server: S3Server,
    pub nodes: Vec<GarageNode>,
}

impl GarageCluster {
    /// Runs the garage command line against node `i`.
    pub fn cli(&self, i: usize, args: &[&str]) -> String {
        garage_cli(&garage_bin(), &self.nodes[i].cfg, args)
    }
}

/// A Garage cluster of `n` nodes on loopback, one per zone, with replication factor 3; its
/// S3 endpoint is the first node's.
pub fn garage_cluster(n: usize) -> GarageCluster {
    let bin = garage_bin();
    let dir = std::env::temp_dir().join(format!("coffer-garage-cluster-{}", random_hex(6)));
    let secret = random_hex(32);
    let mut nodes = Vec::new();
    for i in 0..n {
        let d = dir.join(format!("node{i}"));
        std::fs::create_dir_all(&d).unwrap();
        let (s3, rpc, admin) = (free_port(), free_port(), free_port());
        let cfg = d.join("garage.toml");
        std::fs::write(
            &cfg,
            format!(
                r#"metadata_dir = "{d}/meta"
data_dir = "{d}/data"
db_engine = "lmdb"
replication_factor = 3
rpc_bind_addr = "127.0.0.1:{rpc}"
rpc_public_addr = "127.0.0.1:{rpc}"
rpc_secret = "{secret}"

[s3_api]
s3_region = "us-east-1"
api_bind_addr = "127.0.0.1:{s3}"
root_domain = ".s3.garage.localhost"

[admin]
api_bind_addr = "127.0.0.1:{admin}"
admin_token = "{token}"
"#,
                d = d.display(),
                token = random_hex(16),
            ),
        )
        .unwrap();
        let node = GarageNode {
            log: d.join("garage.log"),
            pidfile: d.join("garage.pid"),
            cfg,
            s3,
            rpc,
        };
        node.start();
        nodes.push(node);
    }
    let first = &nodes[0].cfg;
    let mut ids = Vec::new();
    for node in &nodes {
        let id = garage_cli(&bin, &node.cfg, &["node", "id", "-q"]);
        ids.push(id.trim().split('@').next().unwrap().to_string());
    }
    for (i, node) in nodes.iter().enumerate().skip(1) {
        garage_cli(
            &bin,
            first,
            &[
                "node",
                "connect",
                &format!("{}@127.0.0.1:{}", ids[i], node.rpc),
            ],
        );
    }
    for (i, id) in ids.iter().enumerate() {
        garage_cli(
            &bin,
            first,
            &["layout", "assign", "-z", &format!("dc{i}"), "-c", "10G", id],
        );
    }
    garage_cli(&bin, first, &["layout", "apply", "--version", "1"]);
    let access_key = format!("GK{}", random_hex(12));
    let secret_key = random_hex(32);
    let bucket = "coffer-cluster".to_string();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = Command::new(&bin)
            .arg("-c")
            .arg(first)
            .args(["bucket", "create", &bucket])
            .output()
            .unwrap();
        if out.status.success() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "garage bucket create: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    garage_cli(
        &bin,
        first,
        &[
            "key",
            "import",
            "--yes",
            "-n",
            "coffer",
            &access_key,
            &secret_key,
        ],
    );
    garage_cli(
        &bin,
        first,
        &[
            "bucket", "allow", "--read", "--write", "--owner", &bucket, "--key", "coffer",
        ],
    );
    GarageCluster {
        server: S3Server {
            name: "garage",
            endpoint: format!("http://127.0.0.1:{}", nodes[0].s3),
            region: "us-east-1".into(),
            access_key,
            secret_key,
            bucket,
            ca_pem: None,
            dir,
        },
        nodes,
    }
}
