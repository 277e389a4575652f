//! End to end: `nanofleet-coordinator health`, the exec probe of the Helm chart and the
//! compose file, against a real coordinator on loopback (gRPC health over TLS with the
//! fleet CA).

use std::process::{Command, Output};

use nanofleet_e2e::{bin, Coordinator};

fn health(coordinator: &Coordinator, extra: &[&str]) -> Output {
    Command::new(bin("nanofleet-coordinator"))
        .args(["--data-dir", &coordinator.dir.display().to_string()])
        .args([
            "--grpc-listen",
            &format!("0.0.0.0:{}", coordinator.grpc_port),
        ])
        .arg("health")
        .args(extra)
        .output()
        .expect("nanofleet-coordinator health runs")
}

fn text(output: &Output) -> String {
    format!(
        "stdout: {}\nstderr: {}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

#[test]
fn health_subcommand_checks_grpc_health_over_tls() {
    let root = tempfile::tempdir().unwrap();
    let mut coordinator = Coordinator::start(root.path());

    // The whole server, reached on loopback although the configured address is 0.0.0.0.
    let output = health(&coordinator, &[]);
    assert!(output.status.success(), "{}", text(&output));
    assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), "SERVING");

    // One service by name, through an explicit URL and certificate name.
    let url = coordinator.url();
    let output = health(
        &coordinator,
        &[
            "--url",
            &url,
            "--tls-server-name",
            "localhost",
            "--service",
            "nanofleet.v1.NodeService",
        ],
    );
    assert!(output.status.success(), "{}", text(&output));
    assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), "SERVING");

    // A service the coordinator does not have: NOT_FOUND, a failed probe.
    let output = health(&coordinator, &["--service", "no.such.Service"]);
    assert!(!output.status.success(), "{}", text(&output));
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("NotFound"),
        "{}",
        text(&output)
    );

    // Another fleet's CA: the TLS handshake fails, and so does the probe.
    let other = root.path().join("other-fleet");
    let init = Command::new(bin("nanofleet-coordinator"))
        .args(["--data-dir", &other.display().to_string(), "init"])
        .output()
        .expect("init runs");
    assert!(init.status.success(), "{}", text(&init));
    let output = health(
        &coordinator,
        &["--ca-cert", &other.join("ca.crt").display().to_string()],
    );
    assert!(!output.status.success(), "{}", text(&output));
    assert!(output.stdout.is_empty(), "{}", text(&output));

    // A stopped coordinator fails the probe within the timeout.
    coordinator.kill9();
    let output = health(&coordinator, &["--timeout", "2s"]);
    assert!(!output.status.success(), "{}", text(&output));
}
