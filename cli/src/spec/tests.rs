//! The job file end to end: valid files, every kind of error as the user sees
//! it, and overrides. Paths are checked against this repository, whose
//! `examples/quickstart` is the job the tests load.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use bridge_proto::v1::{JobSpec, PythonEnv, python_env};

use super::{from_str, load};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn parse(text: &str, sets: &[&str]) -> Result<JobSpec, super::SpecError> {
    let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    from_str(text, Path::new("train.toml"), &repo(), &sets).map(|j| j.spec)
}

/// The message the user sees for `text` with `sets`.
fn error(text: &str, sets: &[&str]) -> String {
    match parse(text, sets) {
        Ok(spec) => panic!("accepted: {spec:?}"),
        Err(e) => e.to_string(),
    }
}

/// The quickstart, in a workdir with real files to point at.
const QS: &str = "run = \"python train.py\"\nworkdir = \"examples/quickstart\"\n";

#[test]
fn the_quickstart_job_file() {
    let path = repo().join("examples/quickstart/train.toml");
    let loaded = load(&path, &repo(), &[]).unwrap();
    assert_eq!(loaded.path, path);
    assert_eq!(
        loaded.spec,
        JobSpec {
            name: "digits".into(),
            run: "python train.py --epochs 10 --lr 0.1".into(),
            workdir: "examples/quickstart".into(),
            env: HashMap::from([("SEED".into(), "1".into())]),
            python: Some(PythonEnv {
                kind: python_env::Kind::Requirements as i32,
                file: "examples/quickstart/requirements.txt".into(),
            }),
            outputs: vec!["outputs/".into(), "mlruns/".into()],
            ..Default::default()
        }
    );
    // A directory means the train.toml in it.
    let dir = load(&repo().join("examples/quickstart"), &repo(), &[]).unwrap();
    assert_eq!(dir.path, path);
}

#[test]
fn paths_are_normalised() {
    let spec = parse(
        r#"
        run = "sh -c true"
        workdir = "./examples//quickstart/"
        setup = "  pip download -r requirements.txt  "
        setup_inputs = ["./requirements.txt", "../quickstart/train.py"]
        [python]
        pyproject = "../quickstart/./train.py"
        [resources]
        gpus = 2
        [outputs]
        paths = ["./outputs", "mlruns/", "a/../b/.", "c//d/"]
        local = "./runs/{job}/"
        "#,
        &[],
    )
    .unwrap();
    assert_eq!(spec.name, "train", "the default name is the file stem");
    assert_eq!(spec.workdir, "examples/quickstart");
    assert_eq!(spec.setup, "pip download -r requirements.txt");
    assert_eq!(
        spec.setup_inputs,
        [
            "examples/quickstart/requirements.txt",
            "examples/quickstart/train.py"
        ]
    );
    assert_eq!(
        spec.python,
        Some(PythonEnv {
            kind: python_env::Kind::Pyproject as i32,
            file: "examples/quickstart/train.py".into()
        })
    );
    assert_eq!(spec.gpus, 2);
    assert_eq!(spec.outputs, ["outputs", "mlruns/", "b/", "c/d/"]);
    assert_eq!(spec.outputs_local, "runs/{job}/");

    let root = parse(
        "run = \"x\"\nworkdir = \".\"\n[outputs]\npaths = [\"out/\"]",
        &[],
    )
    .unwrap();
    assert_eq!(root.workdir, "");
    assert_eq!(root.outputs, ["out/"]);
}

#[test]
fn missing_file() {
    let e = load(Path::new("no/such/train.toml"), &repo(), &[]).unwrap_err();
    assert_eq!(
        e.to_string(),
        "no/such/train.toml: no such file (run from the repository, or give the path to the job file)"
    );
}

#[test]
fn toml_syntax_errors_point_at_the_line() {
    assert_eq!(
        error("name = \"x\"\nrun = python train.py\n", &[]),
        "train.toml:2:7: string values must be quoted, expected literal string\n \
         2 | run = python train.py\n   |       ^^^^^^^^^^^^^^^"
    );
    assert_eq!(
        error("run = \"a\"\nrun = \"b\"\n", &[]),
        "train.toml:2:1: duplicate key\n 2 | run = \"b\"\n   | ^^^"
    );
}

#[test]
fn wrong_types_say_what_is_expected() {
    assert_eq!(
        error("run = \"x\"\n[resources]\ngpus = \"two\"\n", &[]),
        "train.toml:3:8: `resources.gpus` must be a whole number ≥ 0, found string \"two\"\n \
         3 | gpus = \"two\"\n   |        ^^^^^"
    );
    assert_eq!(
        error("run = \"x\"\n[resources]\ngpus = -1\n", &[]),
        "train.toml:3:8: `resources.gpus` must be a whole number ≥ 0, found integer `-1`\n \
         3 | gpus = -1\n   |        ^^"
    );
    assert_eq!(
        error("run = \"x\"\n[env]\nSEED = 1\n", &[]),
        "train.toml:3:8: `env.SEED` must be a string, found integer `1` \
         (environment values are strings: quote it, SEED = \"…\")\n 3 | SEED = 1\n   |        ^"
    );
    assert_eq!(
        error("run = \"x\"\nsetup_inputs = \"a.sh\"\n", &[]),
        "train.toml:2:16: `setup_inputs` must be an array of strings, e.g. [\"a\", \"b\"], \
         found string \"a.sh\"\n 2 | setup_inputs = \"a.sh\"\n   |                ^^^^^^"
    );
    assert_eq!(
        error("run = [\"python\", \"x.py\"]\n", &[]),
        "train.toml:1:7: `run` must be a string, found array\n \
         1 | run = [\"python\", \"x.py\"]\n   |       ^^^^^^^^^^^^^^^^^^"
    );
}

#[test]
fn unknown_keys_suggest_the_known_one() {
    assert_eq!(
        error("rn = \"python train.py\"\n", &[]),
        "train.toml:1:1: unknown key `rn`, did you mean `run`?\n 1 | rn = \"python train.py\"\n   | ^^"
    );
    assert_eq!(
        error(&format!("{QS}[python]\nreqirements = \"r.txt\"\n"), &[]),
        "train.toml:4:1: unknown key `reqirements` in [python], did you mean `requirements`?\n \
         4 | reqirements = \"r.txt\"\n   | ^^^^^^^^^^^"
    );
    assert_eq!(
        error("run = \"x\"\n[resources]\nGPUs = 1\n", &[]),
        "train.toml:3:1: unknown key `GPUs` in [resources], did you mean `gpus`?\n \
         3 | GPUs = 1\n   | ^^^^"
    );
    assert_eq!(
        error("run = \"x\"\n[outputs]\npath = [\"o/\"]\n", &[]),
        "train.toml:3:1: unknown key `path` in [outputs], did you mean `paths`?\n \
         3 | path = [\"o/\"]\n   | ^^^^"
    );
    // A sub-table's key at the top level.
    assert_eq!(
        error("run = \"x\"\ngpus = 1\n", &[]),
        "train.toml:2:1: unknown key `gpus`, did you mean `resources.gpus`?\n 2 | gpus = 1\n   | ^^^^"
    );
    // Nothing close: the list of keys instead.
    assert_eq!(
        error("run = \"x\"\ncolour = \"blue\"\n", &[]),
        "train.toml:2:1: unknown key `colour` (known keys: name, run, workdir, image, setup, \
         setup_inputs, env, python, resources, outputs, mode, placement, forward, mlflow, sweep)\n 2 | colour = \"blue\"\n   | ^^^^^^"
    );
}

#[test]
fn semantic_errors_name_the_key() {
    let cases: &[(&str, &str)] = &[
        (
            "name = \"x\"\n",
            "train.toml: `run` is missing: add the command the job runs, e.g. run = \"python train.py\"",
        ),
        (
            "run = \"  \"\n",
            "train.toml:1:7: `run` is empty: give the command the job runs, e.g. run = \"python train.py\"\n \
             1 | run = \"  \"\n   |       ^^^^",
        ),
        (
            "run = \"x\"\nworkdir = \"/work\"\n",
            "train.toml:2:11: `workdir` = \"/work\" is absolute; give it relative to the repository root\n \
             2 | workdir = \"/work\"\n   |           ^^^^^^^",
        ),
        (
            "run = \"x\"\nworkdir = \"examples/../..\"\n",
            "train.toml:2:11: `workdir` = \"examples/../..\" leaves the repository (too many `..`)\n \
             2 | workdir = \"examples/../..\"\n   |           ^^^^^^^^^^^^^^^^",
        ),
        ("run = \"x\"\nworkdir = \"no/such/dir\"\n", "no such dir"),
        (
            &format!("{QS}[python]\nrequirements = \"missing.txt\"\n"),
            "missing file",
        ),
        (
            &format!("{QS}[python]\nrequirements = \"requirements.txt\"\nconda = \"env.yml\"\n"),
            "train.toml:5:9: `python` has both `requirements` and `conda`: give exactly one environment\n \
             5 | conda = \"env.yml\"\n   |         ^^^^^^^^^",
        ),
        (
            &format!("{QS}[python]\n"),
            "train.toml:3:1: `python` needs one of `requirements`, `pyproject` or `conda`, \
             e.g. requirements = \"requirements.txt\"\n 3 | [python]\n   | ^^^^^^^^",
        ),
        (
            &format!("{QS}[python]\nrequirements = \"../../.git/config\"\n"),
            "train.toml:4:16: `python.requirements` = \"../../.git/config\" is inside .git/, which is never synced\n \
             4 | requirements = \"../../.git/config\"\n   |                ^^^^^^^^^^^^^^^^^^^",
        ),
        (
            "run = \"x\"\n[env]\n\"MY-VAR\" = \"1\"\n",
            "train.toml:3:1: `env.MY-VAR` is not a valid variable name (letters, digits and '_', \
             not starting with a digit)\n 3 | \"MY-VAR\" = \"1\"\n   | ^^^^^^^^",
        ),
        (
            "run = \"x\"\n[env]\nBRIDGE_JOB = \"1\"\n",
            "train.toml:3:1: `env.BRIDGE_JOB` is reserved: bridge sets the BRIDGE_* variables itself\n \
             3 | BRIDGE_JOB = \"1\"\n   | ^^^^^^^^^^",
        ),
        (
            "run = \"x\"\n[outputs]\npaths = [\"./\"]\n",
            "train.toml:3:10: `outputs.paths` = \"./\" is the whole workdir, which would keep it all out \
             of the sync; name the directories the job writes, e.g. \"outputs/\"\n \
             3 | paths = [\"./\"]\n   |          ^^^^",
        ),
        (
            "run = \"x\"\n[outputs]\npaths = [\"\"]\n",
            "train.toml:3:10: `outputs.paths` = \"\" is empty\n 3 | paths = [\"\"]\n   |          ^^",
        ),
        (
            &format!("{QS}[outputs]\npaths = [\"../out/\"]\n"),
            "train.toml:4:10: `outputs.paths` = \"../out/\" leaves the workdir: outputs are relative \
             to the workdir and inside it\n 4 | paths = [\"../out/\"]\n   |          ^^^^^^^^^",
        ),
        (
            "run = \"x\"\n[outputs]\npaths = [\"out/\", \"out/models/\"]\n",
            "train.toml:3:18: `outputs.paths` = \"out/models/\" overlaps \"out/\": list each output once \
             (the outer directory only)\n 3 | paths = [\"out/\", \"out/models/\"]\n   |                  ^^^^^^^^^^^^^",
        ),
        (
            &format!(
                "{QS}setup = \"pip install x\"\nsetup_inputs = [\"outputs/\"]\n[outputs]\npaths = [\"outputs/\"]\n"
            ),
            "input inside output",
        ),
        (
            "run = \"x\"\nsetup_inputs = [\"Cargo.toml\"]\n",
            "train.toml:2:17: `setup_inputs` is set but there is no `setup` command (setup inputs only \
             decide when setup reruns)\n 2 | setup_inputs = [\"Cargo.toml\"]\n   |                 ^^^^^^^^^^^^",
        ),
        (
            "run = \"x\"\n[outputs]\npaths = [\"o/\"]\nlocal = \"runs/{id}/\"\n",
            "train.toml:4:9: `outputs.local` = \"runs/{id}/\": the only placeholder is {job} (the job id)\n \
             4 | local = \"runs/{id}/\"\n   |         ^^^^^^^^^^^^",
        ),
        (
            "run = \"x\"\n[outputs]\npaths = [\"o/\"]\nlocal = \"{job}/\"\n",
            "train.toml:4:9: `outputs.local` = \"{job}/\" must start with a directory, e.g. \"runs/{job}/\"\n \
             4 | local = \"{job}/\"\n   |         ^^^^^^^^",
        ),
        (
            "run = \"x\"\n[outputs]\nlocal = \"runs/{job}/\"\n",
            "train.toml:3:9: `outputs.local` is set but `outputs.paths` is empty: there is nothing to \
             bring back\n 3 | local = \"runs/{job}/\"\n   |         ^^^^^^^^^^^^^",
        ),
    ];
    for (text, want) in cases {
        let got = error(text, &[]);
        match *want {
            // These mention this machine's paths: check the stable part.
            "no such dir" => assert!(
                got.starts_with("train.toml:2:11: `workdir` = \"no/such/dir\" is not a directory of the repository "),
                "{got}"
            ),
            "missing file" => assert!(
                got.starts_with("train.toml:4:16: `python.requirements` = \"missing.txt\" does not exist (looked for ")
                    && got.contains("examples/quickstart/missing.txt)"),
                "{got}"
            ),
            "input inside output" => assert!(
                got.starts_with("train.toml:4:17: `setup_inputs` = \"outputs/\" overlaps the output \
                                 \"outputs/\", and outputs are not synced to the agent"),
                "{got}"
            ),
            want => assert_eq!(got, want, "for {text:?}"),
        }
    }
}

#[test]
fn overrides_change_the_spec() {
    let spec = parse(
        &format!("{QS}[resources]\ngpus = 1\n[env]\nSEED = \"1\"\n"),
        &[
            "resources.gpus=2",
            "env.LR=0.01",
            "run=python x.py --epochs 3",
            "name=2024",
            "outputs.paths=[\"outputs/\", \"mlruns\"]",
            "python={requirements=\"requirements.txt\"}",
        ],
    )
    .unwrap();
    assert_eq!(spec.gpus, 2);
    assert_eq!(
        spec.env,
        HashMap::from([("SEED".into(), "1".into()), ("LR".into(), "0.01".into())])
    );
    assert_eq!(spec.run, "python x.py --epochs 3");
    assert_eq!(spec.name, "2024");
    assert_eq!(spec.outputs, ["outputs/", "mlruns"]);
    assert_eq!(
        spec.python.unwrap().file,
        "examples/quickstart/requirements.txt"
    );
    // A required key may come from an override alone.
    assert_eq!(parse("", &["run=true"]).unwrap().run, "true");
}

#[test]
fn override_errors_name_the_override() {
    let cases: &[(&[&str], &str)] = &[
        (
            &["resoures.gpus=2"],
            "--set resoures.gpus=2: unknown key `resoures`, did you mean `resources`?",
        ),
        (
            &["resources.gpu=2"],
            "--set resources.gpu=2: unknown key `gpu` in [resources], did you mean `gpus`?",
        ),
        (
            &["python={requirement=\"r.txt\"}"],
            "--set python={requirement=\"r.txt\"}: unknown key `requirement` in [python], did you mean `requirements`?",
        ),
        (
            &["resources.gpus=two"],
            "--set resources.gpus=two: `resources.gpus` must be a whole number ≥ 0, found string \"two\"",
        ),
        (
            &["env.A=1", "run="],
            "--set run=: `run` is empty: give the command the job runs, e.g. run = \"python train.py\"",
        ),
        (
            &["python.conda=environment.yml"],
            "--set python.conda=environment.yml: `python` has both `requirements` and `conda`: give exactly one environment",
        ),
        (
            &["gpus"],
            "--set gpus: expected KEY=VALUE, e.g. --set resources.gpus=2",
        ),
    ];
    let file = format!("{QS}[python]\nrequirements = \"requirements.txt\"\n");
    for (sets, want) in cases {
        assert_eq!(error(&file, sets), *want, "for {sets:?}");
    }
}

#[test]
fn forwards_live_mode_and_mlflow() {
    use bridge_proto::v1::forward_spec::Direction;
    let spec = parse(
        "run = \"x\"\nmode = \"live\"\n[[forward]]\nport = 6006\nname = \"TensorBoard\"\n\
         [[forward]]\nremote = 8000\nlocal = 18000\n\
         [[forward]]\nport = 5000\nreverse = true\nenv = \"API_PORT\"\n\
         [mlflow]\ntracking_uri = \"http://127.0.0.1:5000\"\n",
        &[],
    )
    .unwrap();
    assert!(spec.live);
    assert_eq!(spec.mlflow_tracking_uri, "http://127.0.0.1:5000");
    let f: Vec<(Direction, u32, u32, &str, &str)> = spec
        .forwards
        .iter()
        .map(|f| {
            (
                f.direction(),
                f.local_port,
                f.remote_port,
                f.name.as_str(),
                f.env.as_str(),
            )
        })
        .collect();
    assert_eq!(
        f,
        [
            (Direction::Local, 6006, 6006, "TensorBoard", ""),
            (Direction::Local, 18000, 8000, "", ""),
            (Direction::Reverse, 5000, 5000, "", "API_PORT"),
        ]
    );
    assert!(!parse("run = \"x\"\n", &[]).unwrap().live);
    assert!(
        !parse("run = \"x\"\nmode = \"snapshot\"\n", &[])
            .unwrap()
            .live
    );
}

#[test]
fn bad_forwards_and_modes_say_where() {
    let cases: &[(&str, &str)] = &[
        (
            "run = \"x\"\nmode = \"hot\"\n",
            "train.toml:2:8: `mode` = \"hot\": use \"snapshot\"",
        ),
        (
            "run = \"x\"\n[[forward]]\nname = \"tb\"\n",
            "train.toml:2:1: `forward` needs the agent's port: port = 6006",
        ),
        (
            "run = \"x\"\n[[forward]]\nport = 70000\n",
            "train.toml:3:8: `forward.port` = 70000 is not a port (0 to 65535)",
        ),
        (
            "run = \"x\"\n[[forward]]\nreverse = true\nremote = 5000\n",
            "train.toml:2:1: `forward` with reverse = true needs the laptop's port",
        ),
        (
            "run = \"x\"\n[[forward]]\nport = 6006\nenv = \"P\"\n",
            "train.toml:4:7: `forward.env` is only for reverse forwards",
        ),
        (
            "run = \"x\"\n[[forward]]\nport = 6006\n[[forward]]\nport = 6006\n",
            "train.toml:4:1: `forward` uses laptop port 6006 twice",
        ),
        (
            "run = \"x\"\n[[forward]]\nport = 6006\nhost = \"0.0.0.0\"\n",
            "train.toml:4:1: unknown key `host` in [forward]",
        ),
        (
            "run = \"x\"\n[mlflow]\ntracking_uri = \"./mlruns\"\n",
            "train.toml:3:16: `mlflow.tracking_uri` = \"./mlruns\" is not the URL of a tracking server",
        ),
        (
            "run = \"x\"\nworkdir = \"examples/quickstart\"\nmode = \"live\"\n[outputs]\npaths = [\"outputs/\"]\n",
            "train.toml:5:10: `outputs.paths` is set but mode = \"live\"",
        ),
    ];
    for (text, want) in cases {
        let got = error(text, &[]);
        assert!(
            got.starts_with(want),
            "{text:?}\n got: {got}\nwant: {want}…"
        );
    }
}

// ---- [sweep] ----

/// The job and its sweep.
fn sweep(text: &str, sets: &[&str]) -> (JobSpec, super::sweep::SweepDef) {
    let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    let j = from_str(text, Path::new("train.toml"), &repo(), &sets).unwrap();
    (j.spec, j.sweep.expect("a sweep"))
}

/// Each trial's parameters as `name=value` words.
fn trials(d: &super::sweep::SweepDef) -> Vec<String> {
    d.trials()
        .iter()
        .map(|t| {
            t.params
                .iter()
                .map(|p| format!("{}={}", p.name, p.value))
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect()
}

#[test]
fn a_grid_is_the_product_of_its_lists_in_the_order_written() {
    let (spec, d) = sweep(
        "run = \"python t.py --lr {lr} --depth {depth}\"\n[resources]\ngpus = 1\n\
         [sweep]\nmax_parallel = 2\nreport = \"val_acc\"\n\
         [sweep.params]\nlr = [1e-3, 3e-4]\ndepth = [4, 8, 16]\n",
        &[],
    );
    assert_eq!(
        trials(&d),
        [
            "lr=0.001 depth=4",
            "lr=0.001 depth=8",
            "lr=0.001 depth=16",
            "lr=0.0003 depth=4",
            "lr=0.0003 depth=8",
            "lr=0.0003 depth=16"
        ]
    );
    assert_eq!(d.count(), Some(6));
    assert_eq!((d.max_parallel, d.report.as_str()), (2, "val_acc"));
    assert_eq!(spec.gpus, 1, "gpus_per_trial defaults to resources.gpus");
    assert_eq!(d.describe(), "a grid over lr × depth");
    let s = d.to_spec(spec);
    assert_eq!((s.method.as_str(), s.trials.len()), ("grid", 6));
    // Values as a trial gets them; a constant is a list of one.
    let (_, d) = sweep(
        "run = \"t {a} {b} {c} {d}\"\n[sweep.params]\na = [1.0, 2.5, -3]\nb = [true]\n\
         c = [\"x y\"]\nd = 7\n",
        &[],
    );
    assert_eq!(trials(&d)[0], "a=1.0 b=true c=x y d=7");
    assert_eq!(trials(&d)[2], "a=-3 b=true c=x y d=7");
}

#[test]
fn a_random_search_draws_the_same_trials_for_the_same_seed() {
    let text = "run = \"t {lr} {depth} {opt}\"\n[sweep]\nmethod = \"random\"\ntrials = 50\nseed = 7\n\
                [sweep.params]\nlr = { loguniform = [1e-5, 1e-1] }\ndepth = { int = [2, 4] }\n\
                opt = [\"adam\", \"sgd\"]\ndrop = { uniform = [0.1, 0.5] }\n";
    let (_, a) = sweep(text, &[]);
    let (_, b) = sweep(text, &[]);
    assert_eq!(trials(&a), trials(&b));
    let (_, c) = sweep(text, &["sweep.seed=8"]);
    assert_ne!(trials(&a), trials(&c));
    let mut depths = std::collections::BTreeSet::new();
    for t in a.trials() {
        let v = |n: &str| t.params.iter().find(|p| p.name == n).unwrap().value.clone();
        let lr: f64 = v("lr").parse().unwrap();
        assert!((1e-5..=1e-1).contains(&lr), "{lr}");
        let drop: f64 = v("drop").parse().unwrap();
        assert!((0.1..0.5).contains(&drop), "{drop}");
        assert!(["adam", "sgd"].contains(&v("opt").as_str()));
        depths.insert(v("depth").parse::<i64>().unwrap());
    }
    assert_eq!(
        depths.into_iter().collect::<Vec<_>>(),
        [2, 3, 4],
        "int ranges include both ends"
    );
    // Pinned: the same seed gives these values in every version.
    assert_eq!(
        trials(&a)[0],
        "lr=0.00004277444547469973 depth=2 opt=sgd drop=0.3906965186853061"
    );
    // No seed: bridge picks one and says so.
    let (_, d) = sweep(&text.replace("seed = 7\n", ""), &[]);
    assert!(d.describe().contains("set sweep.seed"), "{}", d.describe());
}

#[test]
fn list_and_workers_sweeps() {
    let (_, d) = sweep(
        "run = \"t {lr}\"\n[sweep]\nmethod = \"list\"\n[[sweep.trial]]\nlr = 0.1\nwd = 1\n\
         [[sweep.trial]]\nlr = 0.5\n",
        &[],
    );
    assert_eq!(trials(&d), ["lr=0.1 wd=1", "lr=0.5"]);
    // The method follows from the tables when not given.
    let (_, d) = sweep("run = \"t {lr}\"\n[[sweep.trial]]\nlr = 1\n", &[]);
    assert_eq!(trials(&d), ["lr=1"]);
    let (spec, d) = sweep(
        "run = \"python tune.py --worker {trial}\"\n[resources]\ngpus = 2\n[sweep]\nworkers = 3\ngpus_per_trial = 1\n",
        &[],
    );
    assert_eq!(trials(&d), ["", "", ""]);
    assert_eq!(spec.gpus, 1);
    // Literal braces, shell variables and code are not placeholders.
    sweep(
        "run = \"awk '{print $1}' f; echo ${HOME} {{lr}}\"\n[sweep]\nworkers = 1\n",
        &[],
    );
}

fn sweep_error(text: &str) -> String {
    error(text, &[])
}

#[test]
fn sweep_errors_say_where_and_what_to_do() {
    // An unknown placeholder: its own column, and the close name.
    assert_eq!(
        sweep_error("run = \"python t.py --lr {lrr}\"\n[sweep.params]\nlr = [1, 2]\n"),
        "train.toml:1:25: `run` has the placeholder {lrr} but no parameter of [sweep.params] \
         is named \"lrr\", did you mean {lr}?; write {{ and }} for literal braces\n \
         1 | run = \"python t.py --lr {lrr}\"\n   |                         ^^^^^"
    );
    let e = sweep_error("run = \"t {x}\"\n[[sweep.trial]]\nx = 1\n[[sweep.trial]]\ny = 2\n");
    assert!(
        e.contains("trial 1 of [[sweep.trial]] has no parameter \"x\""),
        "{e}"
    );
    // An empty list, with its place.
    let e = sweep_error("run = \"t {lr}\"\n[sweep.params]\nlr = []\n");
    assert!(
        e.starts_with("train.toml:3:6: `sweep.params.lr` is an empty list"),
        "{e}"
    );
    // The same parameter twice (one variable).
    let e = sweep_error("run = \"t {lr}\"\n[sweep.params]\nlr = [1]\nLR = [2]\n");
    assert!(
        e.starts_with("train.toml:4:1: `sweep.params.LR` names the parameter \"lr\" a second time (both would be BRIDGE_PARAM_LR)"),
        "{e}"
    );
    // And TOML's own duplicate key keeps its position.
    let e = sweep_error("run = \"t {lr}\"\n[sweep.params]\nlr = [1]\nlr = [2]\n");
    assert!(e.starts_with("train.toml:4:1:"), "{e}");
    for (text, want) in [
        (
            "run = \"t {lr}\"\n[sweep.params]\nlr = { uniform = [0, 1] }\n",
            "a grid needs a list of values",
        ),
        (
            "run = \"t {lr}\"\n[sweep]\nmethod = \"random\"\n[sweep.params]\nlr = [1]\n",
            "`sweep.trials` is missing",
        ),
        ("run = \"t\"\n[sweep]\nmethod = \"gird\"\n", "use \"grid\""),
        (
            "run = \"t {lr}\"\n[sweep]\nmethod = \"random\"\ntrials = 2\n[sweep.params]\nlr = { loguniform = [0, 1] }\n",
            "both bounds must be above 0",
        ),
        (
            "run = \"t {lr}\"\n[sweep]\nmethod = \"random\"\ntrials = 2\n[sweep.params]\nlr = { normal = [0, 1] }\n",
            "is not a range",
        ),
        (
            "run = \"t {trial}\"\n[sweep.params]\ntrial = [1]\n",
            "is reserved",
        ),
        (
            "run = \"t\"\n[sweep.params]\n2x = [1]\n",
            "is not a parameter name",
        ),
        (
            "run = \"t\"\n[sweep]\nmax_parallel = 0\n[sweep.params]\na = [1]\n",
            "(1 to",
        ),
        (
            "run = \"t\"\nmode = \"live\"\n[sweep.params]\na = [1]\n",
            "mode = \"live\" runs one job in the mirror",
        ),
        (
            "run = \"t\"\n[outputs]\npaths = [\"m.json\"]\n[sweep.params]\na = [1]\n",
            "is a file; a sweep's trials bring each output directory",
        ),
        (
            "run = \"t\"\n[outputs]\npaths = [\"o/\"]\nlocal = \"runs/{job}/\"\n[sweep.params]\na = [1]\n",
            "",
        ),
        (
            "run = \"t\"\n[outputs]\npaths = [\"o/\"]\nlocal = \"runs/{sweep}/\"\n[sweep.params]\na = [1]\n",
            "is one place for every trial",
        ),
        (
            "run = \"t\"\n[[forward]]\nport = 6006\n[sweep.params]\na = [1]\n",
            "which a sweep's trials cannot share",
        ),
        (
            "run = \"t\"\n[sweep]\nworkers = 2\n[sweep.params]\na = [1]\n",
            "workers run the same command",
        ),
        (
            "run = \"t\"\n[sweep]\nsomething = 1\n",
            "unknown key `something` in [sweep]",
        ),
    ] {
        let r = parse(text, &[]);
        if want.is_empty() {
            assert!(r.is_ok(), "{text}: {:?}", r.err());
            continue;
        }
        let e = match r {
            Ok(s) => panic!("accepted {text}: {s:?}"),
            Err(e) => e.to_string(),
        };
        assert!(e.contains(want), "{text}\n→ {e}");
        assert!(e.starts_with("train.toml:"), "no position: {e}");
    }
    // Too many trials for any sweep.
    let e = sweep_error(
        "run = \"t\"\n[sweep.params]\na = [1,2,3,4,5,6,7,8,9,10]\nb = [1,2,3,4,5,6,7,8,9,10]\n\
         c = [1,2,3,4,5,6,7,8,9,10]\nd = [1,2,3,4,5,6,7,8,9,10]\ne = [1,2,3,4,5,6,7,8,9,10]\n\
         f = [1,2,3,4,5,6,7,8,9,10]\ng = [1,2]\n",
    );
    assert!(
        e.contains("makes 2000000 trials; a sweep has at most 1000000"),
        "{e}"
    );
}

#[test]
fn floats_read_back_as_the_same_number() {
    use super::sweep::float;
    assert_eq!(float(0.001), "0.001");
    assert_eq!(float(1.0), "1.0");
    assert_eq!(float(-2.0), "-2.0");
    assert_eq!(float(3e-4), "0.0003");
    assert_eq!(float(0.1 + 0.2), "0.30000000000000004");
}

#[test]
fn an_image_is_a_reference_or_an_error_with_its_line() {
    let spec = parse(
        "image = \"pytorch/pytorch:2.5\"\nrun = \"python t.py\"\n",
        &[],
    )
    .unwrap();
    assert_eq!(spec.image, "pytorch/pytorch:2.5");
    assert_eq!(parse("run = \"x\"\n", &[]).unwrap().image, "");
    let e = error("run = \"x\"\nimage = \"\"\n", &[]);
    assert!(
        e.contains(":2:") && e.contains("image") && e.contains("not an image reference"),
        "{e}"
    );
    let e = error("run = \"x\"\nimage = \"python 3\"\n", &[]);
    assert!(e.contains("not an image reference"), "{e}");
    let spec = parse("run = \"x\"\n", &["image=python:3.11"]).unwrap();
    assert_eq!(spec.image, "python:3.11");
}
