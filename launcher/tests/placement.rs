//! Slurm and MPI environments, as tables of variables.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use llmapi_launch::placement::{
    Launcher, Placement, PlacementError, expand_hostlist, expand_tasks_per_node,
};

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn slurm(
    procid: &str,
    nodeid: &str,
    localid: &str,
    extra: &[(&str, &str)],
) -> Vec<(String, String)> {
    let mut v = env(&[
        ("SLURM_PROCID", procid),
        ("SLURM_NODEID", nodeid),
        ("SLURM_LOCALID", localid),
        ("SLURM_NTASKS", "8"),
        ("SLURM_JOB_NODELIST", "gpu[01-02]"),
        ("SLURM_TASKS_PER_NODE", "4(x2)"),
        ("SLURM_JOB_ID", "4242"),
    ]);
    for (k, val) in extra {
        v.retain(|(key, _)| key != k);
        v.push(((*k).to_owned(), (*val).to_owned()));
    }
    v
}

fn slurm_err(vars: Vec<(String, String)>) -> String {
    Placement::from_env(vars).unwrap_err().to_string()
}

#[test]
fn hostlists_expand_with_padding_and_several_prefixes() {
    assert_eq!(
        expand_hostlist("node[01-04,07],gpu-[1-2]").unwrap(),
        [
            "node01", "node02", "node03", "node04", "node07", "gpu-1", "gpu-2"
        ]
    );
    assert_eq!(expand_hostlist("c1").unwrap(), ["c1"]);
    assert!(expand_hostlist("").unwrap_err().contains("empty"));
    assert!(expand_hostlist("n[4-2]").unwrap_err().contains("backwards"));
}

#[test]
fn tasks_per_node_expands_repeats() {
    assert_eq!(expand_tasks_per_node("2(x3),1").unwrap(), [2, 2, 2, 1]);
    assert_eq!(expand_tasks_per_node("4").unwrap(), [4]);
    assert!(expand_tasks_per_node("2(x3").is_err());
    assert!(expand_tasks_per_node("two").is_err());
}

#[test]
fn no_launcher_variables_means_local() {
    assert_eq!(
        Placement::from_env(env(&[("HOME", "/root")])).unwrap(),
        None
    );
}

#[test]
fn slurm_ranks_split_into_groups_with_leaders_on_their_nodes() {
    let table = [
        // procid, nodeid, localid, group, rank in group, leader node
        ("0", "0", "0", 0, 0, "gpu01"),
        ("3", "0", "3", 1, 1, "gpu01"),
        ("4", "1", "0", 2, 0, "gpu02"),
        ("7", "1", "3", 3, 1, "gpu02"),
    ];
    for (procid, nodeid, localid, group, in_group, leader) in table {
        let p = Placement::from_env(slurm(procid, nodeid, localid, &[]))
            .unwrap()
            .unwrap();
        assert_eq!(p.launcher, Launcher::Slurm);
        assert_eq!((p.world_size, p.nodes.len()), (8, 2));
        assert_eq!(p.job_id.as_deref(), Some("4242"));
        let role = p.role(2).unwrap();
        assert_eq!(role.group, group, "procid {procid}");
        assert_eq!(role.num_groups, 4);
        assert_eq!(role.rank_in_group, in_group);
        assert_eq!(role.leader_node.as_deref(), Some(leader));
        assert_eq!(role.rendezvous_port(29500), 29500 + group as u16);
    }
}

#[test]
fn a_group_may_span_nodes() {
    let vars = slurm(
        "1",
        "1",
        "0",
        &[
            ("SLURM_NTASKS", "2"),
            ("SLURM_JOB_NODELIST", "c[1-2]"),
            ("SLURM_TASKS_PER_NODE", "1(x2)"),
        ],
    );
    let p = Placement::from_env(vars).unwrap().unwrap();
    let role = p.role(2).unwrap();
    assert_eq!((role.group, role.rank_in_group), (0, 1));
    assert_eq!(role.leader_node.as_deref(), Some("c1"));
}

#[test]
fn step_variables_win_over_job_variables() {
    let vars = slurm(
        "0",
        "0",
        "0",
        &[
            ("SLURM_NTASKS", "2"),
            ("SLURM_STEP_NODELIST", "gpu01"),
            ("SLURM_STEP_TASKS_PER_NODE", "2"),
        ],
    );
    let p = Placement::from_env(vars).unwrap().unwrap();
    assert_eq!(p.nodes, ["gpu01"]);
}

#[test]
fn gpus_come_from_the_step_or_cuda_visible_devices() {
    let p = Placement::from_env(slurm("0", "0", "0", &[("SLURM_STEP_GPUS", "0,1,2,3")]))
        .unwrap()
        .unwrap();
    assert_eq!(p.visible_gpus.unwrap(), ["0", "1", "2", "3"]);
    let p = Placement::from_env(slurm("0", "0", "0", &[("CUDA_VISIBLE_DEVICES", "2")]))
        .unwrap()
        .unwrap();
    assert_eq!(p.visible_gpus.unwrap(), ["2"]);
}

#[test]
fn contradictory_slurm_variables_are_named() {
    let cases: &[(&[(&str, &str)], &str)] = &[
        (
            &[("SLURM_NTASKS", "6")],
            "adds up to 8 tasks but SLURM_NTASKS is 6",
        ),
        (&[("SLURM_TASKS_PER_NODE", "4(x3)")], "describes 3 nodes"),
        (&[("SLURM_JOB_NODELIST", "gpu[02-01]")], "backwards"),
        (
            &[("SLURM_NTASKS", "eight")],
            "'eight' provided by SLURM_NTASKS",
        ),
        (
            &[("SLURM_PROCID", "9"), ("SLURM_NTASKS", "8")],
            "not below SLURM_NTASKS",
        ),
    ];
    for (extra, needle) in cases {
        let e = slurm_err(slurm("0", "0", "0", extra));
        assert!(e.contains(needle), "{extra:?}: {e}");
    }
    let mut missing = slurm("0", "0", "0", &[]);
    missing.retain(|(k, _)| k != "SLURM_NTASKS");
    assert!(slurm_err(missing).contains("SLURM_NTASKS is unset"));
    let mut no_nodes = slurm("0", "0", "0", &[]);
    no_nodes.retain(|(k, _)| k != "SLURM_JOB_NODELIST");
    assert!(slurm_err(no_nodes).contains("NODELIST"));
}

#[test]
fn cyclic_distribution_is_refused_with_the_flag_to_use() {
    // Rank 1 on node 1 is what --distribution=cyclic gives; block puts it on node 0.
    let e = slurm_err(slurm("1", "1", "0", &[]));
    assert!(e.contains("--distribution=block"), "{e}");
}

#[test]
fn world_not_divisible_by_tp_size_is_refused() {
    let p = Placement::from_env(slurm("0", "0", "0", &[]))
        .unwrap()
        .unwrap();
    let e = p.role(3).unwrap_err();
    assert_eq!(
        e,
        PlacementError::Indivisible {
            world: 8,
            tp_size: 3
        }
    );
    assert!(e.to_string().contains("multiple of tp_size"), "{e}");
}

#[test]
fn mpi_variables_are_read_when_slurm_is_absent() {
    let p = Placement::from_env(env(&[
        ("OMPI_COMM_WORLD_RANK", "3"),
        ("OMPI_COMM_WORLD_SIZE", "4"),
        ("OMPI_COMM_WORLD_LOCAL_RANK", "1"),
    ]))
    .unwrap()
    .unwrap();
    assert_eq!(p.launcher, Launcher::Mpi);
    assert_eq!((p.rank, p.world_size, p.local_rank), (3, 4, 1));
    assert_eq!(p.role(2).unwrap().group, 1);

    let p = Placement::from_env(env(&[("PMI_RANK", "0"), ("PMI_SIZE", "2")]))
        .unwrap()
        .unwrap();
    assert_eq!((p.rank, p.world_size), (0, 2));

    let e = Placement::from_env(env(&[("PMI_RANK", "0")]))
        .unwrap_err()
        .to_string();
    assert!(e.contains("PMI_SIZE"), "{e}");
    let e = Placement::from_env(env(&[("PMI_RANK", "x"), ("PMI_SIZE", "2")]))
        .unwrap_err()
        .to_string();
    assert!(e.contains("PMI_RANK='x'"), "{e}");
}
