//! `--json`: one JSON document on stdout, and nothing else there, for `build-in-vm`,
//! `vm-image`, `store verify` and `systems` (`bench --quick --json`: in `bench.rs`).

use std::path::Path;

use serde_json::Value;

use crate::nonce;
use vm_tests::{store_dir, xtask, xtask_env, Run, TIMEOUT};

/// Stdout as exactly one JSON document (anything else on stdout fails the test).
fn document(run: &Run) -> Value {
    serde_json::from_str(&run.stdout).unwrap_or_else(|e| panic!("stdout is not one JSON document ({e}): {run:#?}"))
}

/// Checks an item report against the store: the item exists under its hash and name,
/// the content sha256 is its `.meta`'s, the size is the path's.
fn check_item(doc: &Value, name: &str) {
    let item = Path::new(doc["item"].as_str().expect("item"));
    let path = Path::new(doc["path"].as_str().expect("path"));
    assert!(path.starts_with(item) && path.exists(), "{doc}");
    let file_name = item.file_name().unwrap().to_str().unwrap();
    assert_eq!(file_name, format!("{}-{name}", doc["hash"].as_str().unwrap()), "{doc}");
    assert_eq!(doc["name"], name);
    let meta: Value =
        serde_json::from_slice(&std::fs::read(store_dir().join("meta").join(format!("{file_name}.meta"))).unwrap())
            .unwrap();
    assert_eq!(doc["content_sha256"], meta["content_sha256"], "{doc}");
    assert!(doc["wall_s"].as_f64().is_some_and(|t| t >= 0.0), "{doc}");
    if path.is_file() {
        assert_eq!(doc["size_bytes"].as_u64(), Some(std::fs::metadata(path).unwrap().len()), "{doc}");
    }
}

#[test]
fn build_in_vm_json_reports_the_item_built_then_found() {
    let name = format!("json-{}", nonce());
    let args =
        ["build-in-vm", "--json", "--name", &name, "--timeout", TIMEOUT, "--", "sh", "-c", "echo hi > $out/greeting"];
    let built = xtask(&args);
    built.expect_code(0);
    let doc = document(&built);
    check_item(&doc, &name);
    assert_eq!(doc["outcome"], "built", "{doc}");
    assert_eq!(doc["size_bytes"], 3, "{doc}");
    let hit = xtask(&args);
    hit.expect_code(0);
    let again = document(&hit);
    assert_eq!(again["outcome"], "hit", "{again}");
    for key in ["path", "item", "hash", "content_sha256", "size_bytes"] {
        assert_eq!(again[key], doc[key], "{key}");
    }
}

#[test]
fn vm_image_json_reports_the_image() {
    let run = xtask(&["vm-image", "--json", "--format", "raw"]);
    run.expect_code(0);
    let doc = document(&run);
    check_item(&doc, "vm-image-minimal-raw");
    assert!(doc["path"].as_str().unwrap().ends_with("/disk.raw"), "{doc}");
    assert!(matches!(doc["outcome"].as_str(), Some("hit" | "built")), "{doc}");
    let hit = document(xtask(&["vm-image", "--json", "--format", "raw"]).expect_code(0));
    assert_eq!((hit["outcome"].as_str(), &hit["path"]), (Some("hit"), &doc["path"]));
}

#[test]
fn store_verify_json_reports_problems_and_the_repair() {
    let store = tempfile::tempdir().unwrap();
    let env = [("XTASK_VMSTORE", store.path().as_os_str())];
    let clean = xtask_env(&["store", "verify", "--json"], &env);
    clean.expect_code(0);
    let doc = document(&clean);
    assert_eq!((doc["ok"].as_bool(), doc["problems"].as_array().map(Vec::len)), (Some(true), Some(0)), "{doc}");
    assert_eq!(doc["store"], store.path().to_str().unwrap());

    std::fs::write(store.path().join("items/junk"), "x").unwrap();
    let damaged = xtask_env(&["store", "verify", "--json"], &env);
    damaged.expect_code(1);
    let doc = document(&damaged);
    assert_eq!(doc["ok"], false);
    assert_eq!(doc["problems"][0]["entry"], "items/junk", "{doc}");
    assert!(doc["problems"][0]["what"].as_str().unwrap().contains("stray"), "{doc}");

    let repaired = xtask_env(&["store", "verify", "--repair", "--json"], &env);
    repaired.expect_code(0);
    let doc = document(&repaired);
    assert_eq!(doc["ok"], true, "{doc}");
    assert_eq!(doc["repaired"][0]["entry"], "items/junk", "{doc}");
    assert_eq!(doc["repaired"][0]["rebuilt"], false, "{doc}");
    assert_eq!(doc["still_damaged"].as_array().map(Vec::len), Some(0), "{doc}");
    assert!(!store.path().join("items/junk").exists());
}

#[test]
fn systems_json_lists_every_system() {
    let run = xtask(&["systems", "--json"]);
    run.expect_code(0);
    let doc = document(&run);
    let systems = doc["systems"].as_array().expect("systems");
    let hello = systems.iter().find(|s| s["name"] == "hello").expect("hello listed");
    assert_eq!(hello["hostname"], "hello-vm");
    assert_eq!(hello["arch"], "x86_64");
    assert_eq!(hello["services"][0], "hello");
    assert!(hello["packages"].as_array().unwrap().iter().any(|p| p == "crate:hello-service/hello-service"), "{hello}");
    let defaults: Vec<&Value> = systems.iter().filter(|s| s["default"] == true).collect();
    assert_eq!(defaults.len(), 1);
    assert_eq!(defaults[0]["name"], "minimal");
    assert_eq!(systems.len(), xtask(&["systems"]).stdout.lines().count());
}
