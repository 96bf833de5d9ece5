//! A real container runtime drives the CNI plugin: podman (Debian's 4.3.1, CNI network
//! backend, runc) runs containers on a `bpfnat` network inside the lab's node namespace.
//! Published ports, egress, container to container, hairpin, and `podman rm` cleaning up.

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Command, Output},
    time::{Duration, Instant},
};

use bpfnat_tests::{EXT_ADDR, Lab, NODE_ADDR, bin, json, lab, link_exists, traffic, v4};

/// A podman with its own storage and configuration, run inside the lab's node namespace.
struct Podman<'a> {
    lab: &'a Lab,
    dir: PathBuf,
}

impl Podman<'_> {
    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new("podman");
        c.env("CONTAINERS_CONF", self.dir.join("containers.conf"))
            .arg("--root")
            .arg(self.dir.join("root"))
            .arg("--runroot")
            .arg(self.dir.join("runroot"))
            .args(["--storage-driver", "vfs"])
            .args(args);
        nat_plumbing::netns::command_in(&mut c, &self.lab.node).unwrap();
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        self.cmd(args)
            .output()
            .expect("run podman (cargo xtask setup installs it)")
    }

    /// `wget -qO- URL` in a throwaway container on the bpfnat network; its output.
    fn fetch(&self, url: &str) -> String {
        self.ok(&[
            "run",
            "--rm",
            "--network",
            "bpfnat",
            "localhost/bb",
            "/bin/wget",
            "-qO-",
            url,
        ])
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "podman {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Podman<'_> {
    fn drop(&mut self) {
        // Containers hold mounts under the run root: remove them before the lab removes
        // the directories. No panic here: this may run while a failed test unwinds.
        let _ = self.cmd(&["rm", "-af", "-t", "0"]).output();
    }
}

fn setup(lab: &Lab) -> Podman<'_> {
    setup_with(lab, &serde_json::json!({}))
}

/// `setup` with `extra` added to the plugin's configuration.
fn setup_with<'a>(lab: &'a Lab, extra: &serde_json::Value) -> Podman<'a> {
    let dir = lab.state_dir.join("podman");
    let (cni_bin, net_d, rootfs) = (dir.join("cni-bin"), dir.join("net.d"), dir.join("rootfs"));
    for d in [&cni_bin, &net_d, &rootfs.join("bin"), &rootfs.join("www")] {
        std::fs::create_dir_all(d).unwrap();
    }
    std::os::unix::fs::symlink(bin(), cni_bin.join("bpfnat")).unwrap();
    let mut conf = serde_json::json!({
        "cniVersion": "1.0.0",
        "name": "bpfnat",
        "plugins": [{
            "type": "bpfnat",
            "uplink": bpfnat_tests::UPLINK,
            "subnet": "10.88.0.0/16",
            "bpffsDir": lab.bpffs_dir,
            "stateDir": lab.state_dir,
            "capabilities": {"portMappings": true}
        }]
    });
    if let (Some(p), Some(e)) = (conf["plugins"][0].as_object_mut(), extra.as_object()) {
        p.extend(e.clone());
    }
    std::fs::write(net_d.join("bpfnat.conflist"), conf.to_string()).unwrap();
    // Facts about podman on these machines: runc (crun refuses the hybrid cgroup layout),
    // cgroupfs, file events, and ulimits within what the VM allows.
    std::fs::write(
        dir.join("containers.conf"),
        format!(
            "[containers]\ndefault_ulimits = [\"nofile=20000:20000\", \"nproc=32768:32768\"]\n\
             [engine]\ncgroup_manager = \"cgroupfs\"\nevents_logger = \"file\"\nruntime = \"runc\"\n\
             [network]\nnetwork_backend = \"cni\"\ncni_plugin_dirs = [\"{}\"]\nnetwork_config_dir = \"{}\"\n",
            cni_bin.display(),
            net_d.display()
        ),
    )
    .unwrap();
    // The image: a static busybox, imported (no registry is reachable).
    std::fs::copy("/bin/busybox", rootfs.join("bin/busybox")).unwrap();
    for applet in ["sh", "httpd", "wget"] {
        std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(applet)).unwrap();
    }
    std::fs::write(rootfs.join("www/index.html"), "hello-from-podman\n").unwrap();
    let p = Podman { lab, dir };
    let tar = Command::new("tar")
        .arg("-C")
        .arg(&rootfs)
        .args(["-cf", "-", "."])
        .output()
        .unwrap();
    let mut import = p.cmd(&["import", "-", "localhost/bb"]);
    import
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null());
    let mut child = import.spawn().unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), &tar.stdout).unwrap();
    assert!(child.wait().unwrap().success(), "podman import");
    p
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn podman_runs_containers_on_a_bpfnat_network() {
    let lab = lab("podman");
    let p = setup(&lab);
    let id = p
        .ok(&[
            "run",
            "-d",
            "--name",
            "web",
            "--network",
            "bpfnat",
            "-p",
            "8080:80",
            "localhost/bb",
            "/bin/httpd",
            "-f",
            "-p",
            "80",
            "-h",
            "/www",
        ])
        .trim()
        .to_owned();

    // Published port, from outside.
    let mut body = String::new();
    wait_for("the published port", || {
        body = traffic::http_get_raw(&lab.ext, v4(NODE_ADDR, 8080)).unwrap_or_default();
        body.contains("hello-from-podman")
    });

    let list = json(&lab, &["container", "list"]);
    let web = list
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == format!("{id}/eth0"))
        .expect("bpfnat knows the container");
    let web_ip: Ipv4Addr = web["ip"].as_str().unwrap().parse().unwrap();
    let web_netns = PathBuf::from(web["netns"].as_str().unwrap());
    let host_if = web["host_if"].as_str().unwrap().to_owned();

    // Egress through MASQUERADE.
    let srv = traffic::http_server(
        &lab.ext,
        v4(EXT_ADDR, 9000),
        "ext",
        1,
        Duration::from_secs(20),
    )
    .unwrap();
    let out = p.fetch("http://198.51.100.1:9000/");
    assert!(
        out.contains(&format!("you are {NODE_ADDR}:")),
        "egress: {out}"
    );
    srv.join().unwrap();

    // Container to container, and hairpin to its own published port.
    let out = p.fetch(&format!("http://{web_ip}/"));
    assert!(
        out.contains("hello-from-podman"),
        "container to container: {out}"
    );
    let out = p.fetch("http://198.51.100.2:8080/");
    assert!(out.contains("hello-from-podman"), "hairpin: {out}");

    // podman rm: DEL removes everything bpfnat made for the container.
    p.ok(&["rm", "-f", "-t", "0", "web"]);
    assert!(
        json(&lab, &["container", "list"])
            .as_array()
            .unwrap()
            .is_empty()
    );
    assert!(!link_exists(&lab.node, &host_if), "host veth removed");
    assert!(
        !Path::new(&web_netns).exists(),
        "podman removed its namespace"
    );
    assert!(
        json(&lab, &["port", "list"]).as_array().unwrap().is_empty(),
        "host port freed"
    );
}

#[test]
fn podman_runs_dual_stack_containers() {
    let lab = lab("podman6");
    let p = setup_with(&lab, &serde_json::json!({"subnet6": "fd00:88::/64"}));
    p.ok(&[
        "run",
        "-d",
        "--name",
        "web6",
        "--network",
        "bpfnat",
        "localhost/bb",
        "/bin/httpd",
        "-f",
        "-p",
        "80",
        "-h",
        "/www",
    ]);
    // podman took both addresses from the plugin's result.
    let v6 = p
        .ok(&[
            "inspect",
            "--format",
            "{{.NetworkSettings.Networks.bpfnat.GlobalIPv6Address}}",
            "web6",
        ])
        .trim()
        .to_owned();
    let list = json(&lab, &["container", "list"]);
    let web = &list.as_array().unwrap()[0];
    assert_eq!(web["ip6"].as_str(), Some(v6.as_str()), "{list}");
    // Container to container over IPv6.
    let mut out = String::new();
    wait_for("the web container over IPv6", || {
        out = p.fetch(&format!("http://[{v6}]/"));
        out.contains("hello-from-podman")
    });
    p.ok(&["rm", "-f", "-t", "0", "web6"]);
    assert!(
        json(&lab, &["container", "list"])
            .as_array()
            .unwrap()
            .is_empty()
    );
}
