use std::process::Command;

use crate::helpers::*;

/// grpcurl cannot be installed here, so a reflection-only Python client
/// (no proto files) checks the contract over v1 and v1alpha reflection and
/// runs every grpcurl example in the README against the real server.
#[tokio::test]
async fn reflection_serves_the_contract_and_the_readme_examples_work() {
    let app = spawn_app().await;
    let python = std::env::var("DATASTORAGE_TEST_PYTHON")
        .unwrap_or_else(|_| repo_dir().join(".cache/venv/bin/python").display().to_string());
    let output = tokio::task::spawn_blocking({
        let port = app.port;
        move || {
            Command::new(&python)
                .arg(repo_dir().join("tests/grpcurl_examples.py"))
                .args(["--addr", &format!("127.0.0.1:{port}")])
                .arg("--readme")
                .arg(repo_dir().join("README.md"))
                .output()
                .unwrap_or_else(|e| panic!("running {python} (make deps creates it): {e}"))
        }
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "reflection client failed\n{stdout}\n{stderr}");
    assert!(stdout.contains("datastorage.v1.WriteAuditRequest"), "{stdout}");
    let written: i64 = app.count("audit_events").await;
    assert!(written >= 1, "the README's WriteAudit example stored an event");
}
