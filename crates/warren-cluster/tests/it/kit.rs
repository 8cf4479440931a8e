//! The test kit: real broker and registry servers (Debian's packages) started on free ports in a
//! private directory, restartable and killable, stopped on drop. Never the machine's own services.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A free TCP port on 127.0.0.1 (bound and released; tests start servers on it right away).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Wait until something accepts TCP connections on `port`.
pub fn wait_port(port: u16, within: Duration) -> bool {
    let end = Instant::now() + within;
    while Instant::now() < end {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// Which server a [`Server`] runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// nats-server with JetStream (file store in the private directory).
    Nats,
    /// redis-server, nothing persisted.
    Redis,
    /// rabbitmq-server as a private node (its own name, ports and data directory).
    Rabbit,
    /// etcd, one member.
    Etcd,
}

/// One running server process.
pub struct Server {
    kind: Kind,
    /// The client port.
    pub port: u16,
    extra_ports: Vec<u16>,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl Server {
    /// Start a server of `kind` on free ports; panics (failing the test) if it does not come up.
    pub fn start(kind: Kind) -> Server {
        let dir = tempfile::tempdir().expect("temp dir");
        let extra_ports = match kind {
            Kind::Rabbit => vec![free_port()],
            Kind::Etcd => vec![free_port()],
            _ => vec![],
        };
        let mut s = Server {
            kind,
            port: free_port(),
            extra_ports,
            dir,
            child: None,
        };
        s.spawn();
        s
    }

    /// Is the binary installed? Tests of a kind whose server is missing fail with this message.
    pub fn require(kind: Kind) {
        let bin = Self::binary(kind);
        assert!(
            std::path::Path::new(bin).exists(),
            "{bin} is not installed (scripts/test installs it from Debian)"
        );
    }

    fn binary(kind: Kind) -> &'static str {
        match kind {
            Kind::Nats => "/usr/sbin/nats-server",
            Kind::Redis => "/usr/bin/redis-server",
            // the script under /usr/sbin switches to the rabbitmq user; this one runs as the caller
            Kind::Rabbit => "/usr/lib/rabbitmq/bin/rabbitmq-server",
            Kind::Etcd => "/usr/bin/etcd",
        }
    }

    /// The URL clients use (`nats://127.0.0.1:P`, `redis://…`, `amqp://guest:guest@…/%2f`,
    /// `etcd://…`).
    pub fn url(&self) -> String {
        match self.kind {
            Kind::Nats => format!("nats://127.0.0.1:{}", self.port),
            Kind::Redis => format!("redis://127.0.0.1:{}", self.port),
            Kind::Rabbit => format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port),
            Kind::Etcd => format!("etcd://127.0.0.1:{}", self.port),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn spawn(&mut self) {
        let port = self.port.to_string();
        let mut cmd = Command::new(Self::binary(self.kind));
        // crash dumps and stray files land in the private directory, not in the crate
        cmd.current_dir(self.dir.path());
        let log = std::fs::File::create(self.path("server.log")).expect("log file");
        cmd.stdout(Stdio::from(log.try_clone().expect("log fd")))
            .stderr(Stdio::from(log));
        let within = match self.kind {
            Kind::Nats => {
                let sd = self.path("js");
                cmd.args(["-a", "127.0.0.1", "-p", &port, "-js", "-sd"])
                    .arg(sd);
                Duration::from_secs(10)
            }
            Kind::Redis => {
                cmd.args([
                    "--port",
                    &port,
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                ])
                .arg(self.dir.path());
                Duration::from_secs(10)
            }
            Kind::Rabbit => {
                let dist = self.extra_ports[0];
                let name = format!("warren{}@localhost", self.port);
                cmd.env("RABBITMQ_NODENAME", &name)
                    .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
                    .env("RABBITMQ_NODE_PORT", &port)
                    .env("RABBITMQ_DIST_PORT", dist.to_string())
                    .env("RABBITMQ_MNESIA_BASE", self.path("mnesia"))
                    .env("RABBITMQ_LOG_BASE", self.path("log"))
                    .env("RABBITMQ_CONFIG_FILE", self.path("rabbitmq"))
                    .env(
                        "RABBITMQ_ENABLED_PLUGINS_FILE",
                        self.path("enabled_plugins"),
                    )
                    .env("RABBITMQ_PID_FILE", self.path("rabbit.pid"))
                    .env("HOME", self.dir.path());
                std::fs::write(self.path("enabled_plugins"), "[].\n").expect("plugins file");
                // the management listener would take the fixed port 15672: no plugins at all
                std::fs::write(self.path("rabbitmq.conf"), "loopback_users = none\n")
                    .expect("config file");
                Duration::from_secs(60)
            }
            Kind::Etcd => {
                let peer = self.extra_ports[0];
                cmd.arg("--data-dir").arg(self.path("etcd")).args([
                    "--listen-client-urls",
                    &format!("http://127.0.0.1:{port}"),
                    "--advertise-client-urls",
                    &format!("http://127.0.0.1:{port}"),
                    "--listen-peer-urls",
                    &format!("http://127.0.0.1:{peer}"),
                    "--initial-advertise-peer-urls",
                    &format!("http://127.0.0.1:{peer}"),
                    "--initial-cluster",
                    &format!("default=http://127.0.0.1:{peer}"),
                ]);
                Duration::from_secs(20)
            }
        };
        let child = cmd.spawn().expect("start server");
        self.child = Some(child);
        if !wait_port(self.port, within) {
            let log = std::fs::read_to_string(self.path("server.log")).unwrap_or_default();
            panic!("{:?} did not come up on {}: {log}", self.kind, self.port);
        }
        if self.kind == Kind::Rabbit {
            // the AMQP port opens before the broker finishes booting; give it a moment
            std::thread::sleep(Duration::from_secs(2));
        }
    }

    /// SIGKILL the server (its data directory stays).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if self.kind == Kind::Rabbit {
            // rabbitmq-server is a shell script: its Erlang VM (beam) outlives a killed script;
            // the VM is started with `-home <HOME>`, and HOME is this server's private directory
            let home = format!("-home {}", self.dir.path().display());
            let _ = Command::new("pkill")
                .args(["-9", "-f", "--", &home])
                .status();
        }
        let end = Instant::now() + Duration::from_secs(10);
        while Instant::now() < end && std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok()
        {
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Kill and start again on the same port and data directory.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}
