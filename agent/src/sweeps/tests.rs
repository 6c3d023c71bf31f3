//! The scheduler against an in-memory placement: which trial starts when,
//! retries, fail-fast, cancellation and the sweep's end. The integration
//! tests run the same with real jobs.

use std::collections::HashMap;
use std::sync::Mutex as StdMutex;

use super::*;
use crate::gpu::Fixed;

/// Jobs that exist only in memory; the test decides how they end.
#[derive(Default)]
struct Fake {
    jobs: StdMutex<HashMap<String, v1::JobInfo>>,
    started: StdMutex<Vec<v1::JobSpec>>,
    cancelled: StdMutex<Vec<String>>,
}

impl Placement for Arc<Fake> {
    fn check(&self, job: &v1::JobSpec) -> Result<(), Status> {
        let gpus = job.gpus;
        if gpus > 4 {
            return Err(Status::failed_precondition(format!(
                "each trial asks for {gpus} GPU(s) but this agent has 4"
            )));
        }
        Ok(())
    }
    fn capacity(&self, job: &v1::JobSpec, _: u32) -> u32 {
        4u32.checked_div(job.gpus).unwrap_or(8)
    }
    fn launch(&self, _: &str, _: &str, _: &Path, spec: v1::JobSpec) -> Result<v1::JobInfo, Status> {
        let mut jobs = self.jobs.lock().unwrap();
        let id = (jobs.len() + 1).to_string();
        let info = v1::JobInfo {
            id: id.clone(),
            state: JobState::Running as i32,
            started_ms: 1,
            spec: Some(spec.clone()),
            ..Default::default()
        };
        jobs.insert(id, info.clone());
        self.started.lock().unwrap().push(spec);
        Ok(info)
    }
    fn job(&self, id: &str) -> Option<v1::JobInfo> {
        self.jobs.lock().unwrap().get(id).cloned()
    }
    fn cancel(&self, id: &str) {
        self.cancelled.lock().unwrap().push(id.to_string());
        self.end(id, JobState::Cancelled, Some(143));
    }
    fn attempts(&self, sweep: &str) -> Vec<v1::JobInfo> {
        let mut out: Vec<v1::JobInfo> = self
            .jobs
            .lock()
            .unwrap()
            .values()
            .filter(|j| j.spec.as_ref().unwrap().trial.as_ref().unwrap().sweep == sweep)
            .cloned()
            .collect();
        out.sort_by_key(|j| j.id.parse::<u64>().unwrap());
        out
    }
}

impl Fake {
    fn end(&self, id: &str, state: JobState, code: Option<i32>) {
        let mut jobs = self.jobs.lock().unwrap();
        let j = jobs.get_mut(id).unwrap();
        j.state = state as i32;
        j.exit_code = code;
        j.finished_ms = 2;
        j.metrics
            .insert("val_acc".into(), f64::from(code.unwrap_or(0)) / 10.0);
    }
    /// Running jobs, by trial index.
    fn running(&self) -> Vec<(u32, String)> {
        let jobs = self.jobs.lock().unwrap();
        let mut out: Vec<(u32, String)> = jobs
            .values()
            .filter(|j| j.state() == JobState::Running)
            .map(|j| {
                (
                    j.spec.as_ref().unwrap().trial.as_ref().unwrap().index,
                    j.id.clone(),
                )
            })
            .collect();
        out.sort();
        out
    }
}

struct Setup {
    _dir: tempfile::TempDir,
    sweeps: Sweeps,
    fake: Arc<Fake>,
    state: Mutex<State>,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let jobs = Arc::new(Jobs::open(dir.path(), Box::new(Fixed(Vec::new()))).unwrap());
    let fake = Arc::new(Fake::default());
    let sweeps = Sweeps::open(dir.path(), jobs, Box::new(fake.clone()), None).unwrap();
    let store = crate::store::Store::open(&dir.path().join("store"), 1 << 20).unwrap();
    Setup {
        _dir: dir,
        sweeps,
        fake,
        state: Mutex::new(State {
            store,
            mirrors: Default::default(),
        }),
    }
}

fn params(pairs: &[(&str, &str)]) -> Vec<v1::Param> {
    pairs
        .iter()
        .map(|(n, v)| v1::Param {
            name: n.to_string(),
            value: v.to_string(),
        })
        .collect()
}

/// Puts a sweep of `n` trials (param `x` = index) in the table, as a submit
/// would after its snapshot.
fn add(s: &Setup, n: usize, spec: v1::SweepSpec) -> String {
    let job = v1::JobSpec {
        name: "grid".into(),
        run: "train --x {x} --trial {trial}".into(),
        ..Default::default()
    };
    let trials: Vec<TrialInfo> = (0..n)
        .map(|i| TrialInfo {
            index: i as u32,
            params: params(&[("x", &i.to_string())]),
            state: JobState::Queued as i32,
            ..Default::default()
        })
        .collect();
    let max_parallel = if spec.max_parallel > 0 {
        spec.max_parallel
    } else {
        s.sweeps.placement.capacity(&v1::JobSpec::default(), 1)
    };
    let info = SweepInfo {
        id: "s1".into(),
        name: "grid".into(),
        state: JobState::Queued as i32,
        mirror: "m".into(),
        generation: "g".into(),
        spec: Some(v1::SweepSpec {
            job: Some(job),
            ..spec
        }),
        trials,
        max_parallel,
        ..Default::default()
    };
    fs::create_dir_all(s.sweeps.sweep_dir(1)).unwrap();
    let rec = SweepRecord {
        info: Some(info),
        cancel_requested: false,
    };
    s.sweeps.save(1, &rec);
    s.sweeps.inner.lock().unwrap().sweeps.insert(
        1,
        Sweep {
            rec,
            runs: (0..n).map(|_| TrialRun::default()).collect(),
            parent: Parent::Unknown,
            repair: None,
            dirty: false,
            saved_at: Instant::now(),
        },
    );
    "s1".into()
}

fn tick(s: &Setup) -> SweepInfo {
    s.sweeps.poll(&s.state, &[]);
    s.sweeps.get("s1").unwrap()
}

#[test]
fn trials_start_in_order_never_more_than_max_parallel() {
    let s = setup();
    add(
        &s,
        5,
        v1::SweepSpec {
            max_parallel: 2,
            report: "val_acc".into(),
            ..Default::default()
        },
    );
    let i = tick(&s);
    assert_eq!(i.state(), JobState::Running);
    assert_eq!(
        s.fake.running().iter().map(|r| r.0).collect::<Vec<_>>(),
        [0, 1]
    );
    // The command and environment of a trial.
    let first = s.fake.started.lock().unwrap()[0].clone();
    assert_eq!(first.run, "train --x 0 --trial 0");
    assert_eq!(first.env["BRIDGE_PARAM_X"], "0");
    assert_eq!(first.name, "grid/0");
    assert_eq!(first.trial.as_ref().unwrap().attempt, 1);
    // Nothing more starts while two run.
    tick(&s);
    assert_eq!(s.fake.running().len(), 2);
    let (_, j1) = s.fake.running()[1].clone();
    s.fake.end(&j1, JobState::Succeeded, Some(0));
    let i = tick(&s);
    assert_eq!(
        s.fake.running().iter().map(|r| r.0).collect::<Vec<_>>(),
        [0, 2]
    );
    assert_eq!(i.trials[1].state(), JobState::Succeeded);
    assert_eq!(i.trials[1].metric, Some(0.0), "the job's BRIDGE_METRIC");
    while !s.fake.running().is_empty() {
        for (_, j) in s.fake.running() {
            s.fake.end(&j, JobState::Succeeded, Some(0));
        }
        tick(&s);
    }
    let i = tick(&s);
    assert_eq!(i.state(), JobState::Succeeded);
    assert!(i.finished_ms > 0);
    assert_eq!(s.fake.started.lock().unwrap().len(), 5);
    // The record on disk says the same.
    let rec = SweepRecord::decode(
        fs::read(s.sweeps.sweep_dir(1).join("record.pb"))
            .unwrap()
            .as_slice(),
    )
    .unwrap();
    assert_eq!(rec.info.unwrap().state(), JobState::Succeeded);
}

#[test]
fn a_failed_trial_is_retried_then_fails_the_sweep_and_the_rest_still_run() {
    let s = setup();
    add(
        &s,
        3,
        v1::SweepSpec {
            max_parallel: 3,
            retries: 1,
            ..Default::default()
        },
    );
    tick(&s);
    let jobs = s.fake.running();
    s.fake.end(&jobs[0].1, JobState::Failed, Some(3));
    let i = tick(&s);
    assert_eq!(
        i.trials[0].jobs.len(),
        2,
        "a second attempt: {:?}",
        i.trials[0]
    );
    assert!(
        i.trials[0].reason.contains("retrying"),
        "{}",
        i.trials[0].reason
    );
    let retry = s.fake.started.lock().unwrap().last().cloned().unwrap();
    assert_eq!(retry.trial.unwrap().attempt, 2);
    for (_, j) in s.fake.running() {
        let code = if j == i.trials[0].current_job { 3 } else { 0 };
        let st = if code == 0 {
            JobState::Succeeded
        } else {
            JobState::Failed
        };
        s.fake.end(&j, st, Some(code));
    }
    let i = tick(&s);
    assert_eq!(i.state(), JobState::Failed);
    assert_eq!(i.trials[0].state(), JobState::Failed);
    assert_eq!(i.trials[0].exit_code, Some(3));
    assert_eq!(i.trials[1].state(), JobState::Succeeded);
    assert_eq!(i.reason, "1 of 3 trials failed");
}

#[test]
fn fail_fast_cancels_the_running_trials_and_starts_no_more() {
    let s = setup();
    add(
        &s,
        4,
        v1::SweepSpec {
            max_parallel: 2,
            fail_fast: true,
            ..Default::default()
        },
    );
    tick(&s);
    let jobs = s.fake.running();
    s.fake.end(&jobs[0].1, JobState::Failed, Some(1));
    let i = tick(&s);
    assert_eq!(
        s.fake.cancelled.lock().unwrap().as_slice(),
        [jobs[1].1.clone()]
    );
    assert_eq!(
        s.fake.started.lock().unwrap().len(),
        2,
        "nothing new started"
    );
    let i = if is_terminal(i.state()) { i } else { tick(&s) };
    assert_eq!(i.state(), JobState::Failed);
    assert!(
        i.reason.contains("trial 0 failed (exit 1); fail_fast"),
        "{}",
        i.reason
    );
    assert_eq!(i.trials[2].state(), JobState::Cancelled);
    assert_eq!(i.trials[2].reason, "cancelled before it started");
}

#[test]
fn cancel_stops_running_trials_and_the_sweep_ends_cancelled() {
    let s = setup();
    add(&s, 3, v1::SweepSpec::default());
    tick(&s);
    assert_eq!(s.fake.running().len(), 3, "CPU trials: as many as fit");
    s.sweeps.cancel("s1").unwrap();
    let i = tick(&s);
    let i = if is_terminal(i.state()) { i } else { tick(&s) };
    assert_eq!(i.state(), JobState::Cancelled);
    assert_eq!(s.fake.cancelled.lock().unwrap().len(), 3);
    assert!(i.trials.iter().all(|t| t.state() == JobState::Cancelled));
    let e = s.sweeps.cancel("s1").unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition);
    assert_eq!(s.sweeps.active(), 0);
}

#[test]
fn templates_are_checked_and_expanded() {
    let job = |run: &str| v1::JobSpec {
        run: run.into(),
        ..Default::default()
    };
    let trials = vec![v1::TrialParams {
        params: params(&[("lr", "0.1")]),
    }];
    assert!(check_template(&job("t {lr} {trial} {sweep}"), &trials).is_ok());
    let e = check_template(&job("t {depth}"), &trials).unwrap_err();
    assert!(e.message().contains("{depth}"), "{}", e.message());
    assert!(check_template(&job("t"), &[]).is_err());
    let live = v1::JobSpec {
        live: true,
        ..job("t")
    };
    assert!(check_template(&live, &trials).is_err());
    let bad = vec![v1::TrialParams {
        params: params(&[("a-b", "1")]),
    }];
    assert!(check_template(&job("t"), &bad).is_err());

    let t = TrialInfo {
        index: 3,
        params: params(&[("lr", "0.001"), ("opt", "adam")]),
        ..Default::default()
    };
    let spec = trial_spec(
        &job("python t.py --lr {lr} --opt={opt} -o out/{sweep}-{trial} {{x}}"),
        "s9",
        "exp",
        &t,
        2,
    );
    assert_eq!(
        spec.run,
        "python t.py --lr 0.001 --opt=adam -o out/s9-3 {x}"
    );
    assert_eq!(spec.env["BRIDGE_PARAM_LR"], "0.001");
    assert_eq!(spec.env["BRIDGE_PARAM_OPT"], "adam");
    assert_eq!(spec.name, "exp/3");
    assert_eq!(
        spec.trial,
        Some(v1::TrialRef {
            sweep: "s9".into(),
            index: 3,
            attempt: 2
        })
    );
}

#[test]
fn a_record_on_disk_is_followed_after_a_restart() {
    let s = setup();
    add(
        &s,
        2,
        v1::SweepSpec {
            max_parallel: 1,
            ..Default::default()
        },
    );
    tick(&s);
    let root = s.sweeps.dir.parent().unwrap().to_path_buf();
    let again = Sweeps::open(&root, s.sweeps.jobs.clone(), Box::new(s.fake.clone()), None).unwrap();
    let i = again.get("s1").unwrap();
    assert_eq!(i.trials[0].current_job, "1");
    let (_, j) = s.fake.running()[0].clone();
    s.fake.end(&j, JobState::Succeeded, Some(0));
    again.poll(&s.state, &[]);
    let i = again.get("s1").unwrap();
    assert_eq!(i.trials[0].state(), JobState::Succeeded);
    assert_eq!(i.trials[1].current_job, "2", "the next trial started");
    assert_eq!(again.get("s9").unwrap_err().code(), tonic::Code::NotFound);
    // An attempt started after the record was last written (the agent
    // stopped before the next save) is found again from its job.
    std::thread::sleep(SAVE_EVERY);
    again.poll(&s.state, &[]);
    let stale = fs::read(again.sweep_dir(1).join("record.pb")).unwrap();
    let (_, j) = s.fake.running()[0].clone();
    s.fake.end(&j, JobState::Succeeded, Some(0));
    let orphan = s
        .fake
        .launch(
            "m",
            "g",
            Path::new("/"),
            trial_spec(
                &v1::JobSpec {
                    run: "x".into(),
                    ..Default::default()
                },
                "s1",
                "grid",
                &again.get("s1").unwrap().trials[1],
                2,
            ),
        )
        .unwrap();
    fs::write(again.sweep_dir(1).join("record.pb"), stale).unwrap();
    let third = Sweeps::open(&root, s.sweeps.jobs.clone(), Box::new(s.fake.clone()), None).unwrap();
    let i = third.get("s1").unwrap();
    assert_eq!(
        i.trials[1].current_job, orphan.id,
        "the newest attempt is followed"
    );
    assert_eq!(i.trials[1].jobs.len(), 2);
    assert_eq!(
        again.get("9").unwrap_err().code(),
        tonic::Code::InvalidArgument
    );
}
