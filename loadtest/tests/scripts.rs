//! The load scenarios parse: every k6 script as an ES module (node) and every wrk script as Lua
//! (LuaJIT, the Lua wrk embeds), and each wrk scenario has its k6 twin.

use std::path::Path;
use std::process::Command;

#[test]
fn every_load_scenario_parses() {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    let output = Command::new("bash")
        .arg(here.join("check-scripts.sh"))
        .output()
        .expect("run check-scripts.sh");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "check-scripts.sh failed ({:?}; make test installs node and luajit):\n{stdout}{stderr}",
        output.status.code()
    );
    let scenarios: Vec<String> = std::fs::read_dir(here.join("scenarios"))
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".lua"))
        .collect();
    assert!(scenarios.len() >= 6, "{scenarios:?}");
    for scenario in &scenarios {
        let k6 = scenario.replace(".lua", ".js");
        for name in [scenario.as_str(), k6.as_str()] {
            assert!(
                stdout
                    .lines()
                    .any(|line| line.starts_with("ok") && line.contains(name)),
                "{name} was not checked:\n{stdout}"
            );
        }
    }
}

#[test]
fn a_broken_scenario_is_caught() {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    let copy = tempfile::tempdir().unwrap();
    for folder in ["scenarios", "k6", "k6/lib"] {
        std::fs::create_dir_all(copy.path().join(folder)).unwrap();
        for entry in std::fs::read_dir(here.join(folder)).unwrap() {
            let entry = entry.unwrap();
            if entry.file_type().unwrap().is_file() {
                std::fs::copy(
                    entry.path(),
                    copy.path().join(folder).join(entry.file_name()),
                )
                .unwrap();
            }
        }
    }
    std::fs::copy(
        here.join("check-scripts.sh"),
        copy.path().join("check-scripts.sh"),
    )
    .unwrap();
    std::fs::write(
        copy.path().join("scenarios/plain.lua"),
        "request = function(\n",
    )
    .unwrap();
    std::fs::write(
        copy.path().join("k6/plain.js"),
        "export default function ( {\n",
    )
    .unwrap();
    let output = Command::new("bash")
        .arg(copy.path().join("check-scripts.sh"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(1), "{stdout}");
    let failed: Vec<&str> = stdout
        .lines()
        .filter(|line| line.starts_with("FAIL"))
        .collect();
    assert!(
        failed.iter().any(|line| line.contains("plain.lua")),
        "{stdout}"
    );
    assert!(
        failed.iter().any(|line| line.contains("plain.js")),
        "{stdout}"
    );
}
