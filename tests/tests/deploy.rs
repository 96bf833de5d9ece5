//! The deployment files agree with the code: the DaemonSet's mounts and paths, the agent
//! configuration it ships, the example conflist; and the agent installs the CNI plugin and a
//! configuration that the plugin accepts.

use std::path::{Path, PathBuf};

use yaml_rust2::{Yaml, YamlLoader};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn docs() -> Vec<Yaml> {
    let text = std::fs::read_to_string(root().join("deploy/daemonset.yaml")).unwrap();
    YamlLoader::load_from_str(&text).expect("valid YAML")
}

fn kind<'a>(docs: &'a [Yaml], k: &str) -> &'a Yaml {
    docs.iter()
        .find(|d| d["kind"].as_str() == Some(k))
        .unwrap_or_else(|| panic!("no {k}"))
}

#[test]
fn daemonset_mounts_and_paths_match_the_code() {
    let docs = docs();
    let ds = kind(&docs, "DaemonSet");
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(
        pod["hostNetwork"].as_bool(),
        Some(true),
        "the agent works in the node's namespace"
    );
    let c = &pod["containers"][0];
    assert_eq!(c["securityContext"]["privileged"].as_bool(), Some(true));
    let cmd: Vec<&str> = c["command"]
        .as_vec()
        .unwrap()
        .iter()
        .filter_map(Yaml::as_str)
        .collect();
    let arg = |flag: &str| {
        cmd.iter()
            .position(|a| *a == flag)
            .map(|i| cmd[i + 1])
            .unwrap_or_else(|| panic!("no {flag}"))
    };
    // The CLI's defaults, which the CNI plugin also uses when the conflist names no dirs.
    assert_eq!(arg("--bpffs-dir"), "/sys/fs/bpf/bpfnat");
    assert_eq!(arg("--state-dir"), "/run/bpfnat");
    assert!(cmd.contains(&"agent"));
    let config_path = arg("--config");

    let mounts: Vec<(&str, &str)> = c["volumeMounts"]
        .as_vec()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["name"].as_str().unwrap(),
                m["mountPath"].as_str().unwrap(),
            )
        })
        .collect();
    let host: Vec<(&str, &str)> = pod["volumes"]
        .as_vec()
        .unwrap()
        .iter()
        .filter_map(|v| Some((v["name"].as_str()?, v["hostPath"]["path"].as_str()?)))
        .collect();
    let mounted = |path: &str| mounts.iter().any(|(_, p)| path.starts_with(p));
    for p in [
        "/sys/fs/bpf/bpfnat",
        "/run/bpfnat",
        "/run/netns",
        "/sys/fs/cgroup",
        config_path,
    ] {
        assert!(mounted(p), "{p} is not mounted into the agent");
    }
    for needed in [
        "/sys/fs/bpf",
        "/run/netns",
        "/opt/cni/bin",
        "/etc/cni/net.d",
        "/run/bpfnat",
    ] {
        assert!(
            host.iter().any(|(_, p)| *p == needed),
            "host path {needed} missing"
        );
    }

    // The shipped agent configuration is one the agent accepts, and agrees with the pod.
    let cm = kind(&docs, "ConfigMap");
    let json = cm["data"]["agent.json"].as_str().unwrap();
    let tmp = std::env::temp_dir().join("bpfnat-deploy-agent.json");
    std::fs::write(&tmp, json).unwrap();
    let cfg = bpfnat::agent::load_config(Some(&tmp)).expect("agent accepts the ConfigMap");
    std::fs::remove_file(&tmp).unwrap();
    let port = cfg.metrics_addr.port();
    assert_eq!(
        c["livenessProbe"]["httpGet"]["port"].as_i64(),
        Some(i64::from(port))
    );
    assert_eq!(
        c["livenessProbe"]["httpGet"]["path"].as_str(),
        Some("/healthz")
    );
    // A cluster node on the Kubernetes datastore: its name from the downward API, Nodes
    // readable by its service account, a pinned image and resource requests.
    let cluster = cfg
        .cluster
        .as_ref()
        .expect("the ConfigMap configures a cluster");
    let env = c["env"].as_vec().unwrap();
    assert!(env.iter().any(|e| e["name"].as_str() == Some("NODE_NAME")
        && e["valueFrom"]["fieldRef"]["fieldPath"].as_str() == Some("spec.nodeName")));
    // SAFETY: this test's process sets it before anything reads it.
    unsafe { std::env::set_var("NODE_NAME", "node-a") };
    let checked = cluster
        .check("hostname")
        .expect("the cluster section is valid");
    assert_eq!(checked.node_name, "node-a");
    assert_eq!(checked.datastore_name(), "kubernetes");
    let sa = kind(&docs, "ServiceAccount")["metadata"]["name"]
        .as_str()
        .unwrap();
    assert_eq!(pod["serviceAccountName"].as_str(), Some(sa));
    let role = kind(&docs, "ClusterRole");
    let rule = &role["rules"][0];
    let strs = |y: &Yaml| -> Vec<String> {
        y.as_vec()
            .unwrap()
            .iter()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect()
    };
    assert_eq!(strs(&rule["resources"]), ["nodes"]);
    assert_eq!(strs(&rule["verbs"]), ["get", "list", "watch"]);
    let binding = kind(&docs, "ClusterRoleBinding");
    assert_eq!(binding["roleRef"]["name"], role["metadata"]["name"]);
    assert_eq!(binding["subjects"][0]["name"].as_str(), Some(sa));
    let image = c["image"].as_str().unwrap();
    assert!(
        !image.ends_with(":latest") && image.contains(&format!(":{}", env!("CARGO_PKG_VERSION"))),
        "a pinned image tag: {image}"
    );
    assert!(c["resources"]["requests"]["cpu"].as_str().is_some());
    assert!(c["resources"]["requests"]["memory"].as_str().is_some());

    for dir in [cfg.cni_bin_dir.unwrap(), cfg.cni_conf_dir.unwrap()] {
        assert!(
            mounted(dir.to_str().unwrap()),
            "{} is not mounted",
            dir.display()
        );
    }
}

#[test]
fn example_conflist_is_what_the_plugin_reads() {
    let text = std::fs::read_to_string(root().join("deploy/cni/bpfnat.conflist")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    // 1.1.0: libcni sends GC and STATUS only to networks of that version.
    assert_eq!(v["cniVersion"], "1.1.0");
    assert!(bpfnat::cni::SUPPORTED_VERSIONS.contains(&v["cniVersion"].as_str().unwrap()));
    let p = &v["plugins"][0];
    assert_eq!(p["type"], "bpfnat", "the plugin binary's name");
    assert_eq!(p["capabilities"]["portMappings"], true);
    assert_eq!(p["bpffsDir"], "/sys/fs/bpf/bpfnat");
    assert_eq!(p["stateDir"], "/run/bpfnat");
    assert!(p["uplink"].is_string() && p["subnet"].is_string());
    // Dual-stack: an IPv6 subnet beside the IPv4 one, as `up --subnet6` takes it.
    let s6 = p["subnet6"].as_str().expect("a dual-stack example");
    let args = ["bpfnat", "up", "--uplink", "eth0", "--subnet6", s6];
    let cli = <bpfnat::cli::Cli as clap::Parser>::try_parse_from(args);
    assert!(cli.is_ok(), "{s6}: {:?}", cli.err());
}

#[test]
fn the_agent_installs_the_cni_plugin_and_its_configuration() {
    let lab = bpfnat_tests::lab("agentcni");
    std::fs::create_dir_all(&lab.state_dir).unwrap();
    let (bin_dir, conf_dir) = (lab.state_dir.join("cni-bin"), lab.state_dir.join("net.d"));
    let cfg = lab.state_dir.join("agent.json");
    std::fs::write(
        &cfg,
        serde_json::json!({
            "uplink": bpfnat_tests::UPLINK,
            "metricsAddr": "127.0.0.1:9974",
            "cniBinDir": bin_dir,
            "cniConfDir": conf_dir,
            "subnet6": "fd00:88::/64",
        })
        .to_string(),
    )
    .unwrap();
    let mut c = lab
        .bpfnat(&["agent", "--config", cfg.to_str().unwrap()])
        .unwrap();
    c.stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let mut agent = c.spawn().unwrap();
    let conflist = conf_dir.join("10-bpfnat.conflist");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !conflist.exists() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let _ = agent.kill();
    let _ = agent.wait();
    let plugin = bin_dir.join("bpfnat");
    assert!(plugin.exists(), "plugin installed");
    let out = std::process::Command::new(&plugin)
        .env("CNI_COMMAND", "VERSION")
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("supportedVersions"),
        "the installed plugin answers VERSION"
    );
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&conflist).unwrap()).unwrap();
    assert_eq!(v["cniVersion"], "1.1.0");
    assert_eq!(v["plugins"][0]["uplink"], bpfnat_tests::UPLINK);
    assert_eq!(
        v["plugins"][0]["subnet6"], "fd00:88::/64",
        "dual-stack from the agent"
    );
    assert_eq!(v["plugins"][0]["gateway6"], "fd00:88::1");
    assert_eq!(
        v["plugins"][0]["bpffsDir"],
        serde_json::json!(lab.bpffs_dir)
    );
    // containerd needs `loopback` beside the plugin: the node's own is copied there
    // (`cargo xtask setup` installs podman, whose CNI plugins include it).
    let node_loopback = ["/opt/cni/bin", "/usr/lib/cni", "/usr/libexec/cni"]
        .iter()
        .map(|d| Path::new(d).join("loopback"))
        .find(|p| p.is_file())
        .expect("the reference CNI plugins are installed");
    assert_eq!(
        std::fs::read(bin_dir.join("loopback")).ok(),
        std::fs::read(node_loopback).ok(),
        "loopback installed beside the plugin"
    );
}
