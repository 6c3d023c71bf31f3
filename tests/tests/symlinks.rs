use bridge_tests::*;

#[test]
fn inside_links_are_kept_escaping_ones_reported() {
    let r = Repo::new();
    r.write("data/v1/train.csv", "a,b\n");
    r.symlink("v1", "data/current");
    r.symlink("../data/v1/train.csv", "latest.csv");
    r.symlink("/etc/passwd", "abs");
    r.symlink("../../outside", "escape");
    r.up();
    let m = r.mirror();
    assert_eq!(
        std::fs::read_link(m.join("data/current")).unwrap().to_str(),
        Some("v1")
    );
    assert!(
        m.join("latest.csv").symlink_metadata().is_err(),
        "latest.csv points outside the tree from the top level"
    );
    assert!(m.join("abs").symlink_metadata().is_err());
    assert!(m.join("escape").symlink_metadata().is_err());
    let st = r.status();
    let skipped = st["skipped"].as_array().unwrap();
    let reason = |p: &str| {
        skipped
            .iter()
            .find(|s| s["path"] == p)
            .map(|s| s["reason"].as_str().unwrap().to_string())
            .unwrap_or_else(|| panic!("{p} not reported as skipped: {skipped:?}"))
    };
    assert!(reason("abs").contains("absolute"));
    assert!(reason("escape").contains("leaves the repository"));
    assert!(reason("latest.csv").contains("leaves the repository"));
    let out = r.ok(&["status"]);
    assert!(out.contains("abs: absolute symlink"), "{out}");
    assert_eq!(st["connection"], "connected", "skipped links are not fatal");

    // Live: a link retargeted, replaced by a file.
    std::fs::remove_file(r.path("data/current")).unwrap();
    r.symlink("v1/train.csv", "data/current");
    r.wait_mirror("the retargeted link", |m| {
        std::fs::read_link(m.join("data/current")).is_ok_and(|t| t.to_str() == Some("v1/train.csv"))
    });
    r.remove("data/current");
    r.write("data/current", "a file now\n");
    r.wait_mirror("link replaced by a file", |m| {
        m.join("data/current")
            .symlink_metadata()
            .is_ok_and(|md| md.is_file())
    });
    r.sync_wait();
}
