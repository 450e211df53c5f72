//! Every input of the fuzz corpora (`tests/fuzz/corpus/<target>/`, grown by `make fuzz` with a
//! nightly toolchain) through its target, under stable: what a fuzzing run once found
//! interesting stays checked by every test run.

#[path = "fuzz/bodies.rs"]
mod bodies;

fn replay(target: &str, run: fn(&[u8])) {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fuzz/corpus")
        .join(target);
    let mut inputs = 0;
    for entry in
        std::fs::read_dir(&dir).unwrap_or_else(|error| panic!("{}: {error}", dir.display()))
    {
        let path = entry.unwrap().path();
        let data = std::fs::read(&path).unwrap();
        let outcome = std::panic::catch_unwind(|| run(&data));
        assert!(
            outcome.is_ok(),
            "{target}: {} fails ({:?})",
            path.display(),
            String::from_utf8_lossy(&data)
        );
        inputs += 1;
    }
    assert!(
        inputs >= 5,
        "{target}: only {inputs} inputs in {}",
        dir.display()
    );
}

#[test]
fn proxy_header_corpus() {
    replay("proxy_header", bodies::proxy_header);
}

#[test]
fn path_corpus() {
    replay("path", bodies::path);
}

#[test]
fn config_corpus() {
    replay("config", bodies::config);
}

#[test]
fn jwt_corpus() {
    replay("jwt", bodies::jwt);
}

#[test]
fn template_corpus() {
    replay("template", bodies::template);
}
