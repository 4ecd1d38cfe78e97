"""
The harness behind agent_loop.py and prepare.py: fixed code that no agent edits.

The experiment loop (agent_loop.py is its command line):
    layout.py      where the loop keeps things (files, branches, refs), LoopError, small shared helpers
    gitrepo.py     git through its command line: commits of named paths, what changed, blob ids, ignores
    ledger.py      results.tsv: columns, reading, crash-safe appends, the best row, unmeasured rows
    process.py     children in their own process group: timeouts, kills, leftovers; SIGTERM as a stop
    seal.py        the sealed repository beyond tracked files: untracked importable files, ctimes, bytecode,
                   train.py a regular file; the harness's folders (the evaluator's compile cache); the ledger's
    runner.py      one train.py run: environment, time limit, log, summary block, crash verdict
    confine.py     a run may write only in its own folders and signal only its own processes (Landlock)
    carryover.py   what a run wrote where later runs read, after it opened its training data, removed
    valwatch.py    which val files a run opened and which metric files it wrote, when it opened training data
    decide.py      the keep rule: first run, then pairs with the best, a sequential test; speed, noise
    state.py       one tag's state: Loop, lock, config pinned at init, running.json (InFlight), loop.log
    preflight.py   checks before init and before each experiment, each with the command that fixes it
    resume.py      saving work under refs/autoresearch/, resetting to the best, resuming after a kill
    experiment.py  one experiment from proposed change to results row, and the baseline (#0)
    workers.py     run --workers N: a coordinator (the one writer) and a worker process per worktree and device
    rayexec.py     run --executor ray: each run a Ray task on a cluster, the code sent as a git bundle
    launch/        SkyPilot and Slurm recipes that start Ray on every node and the loop on the first
    mutate.py      the offline proposer's seeded edit of one hyperparameter line of train.py
    proposers.py   mutate and an external agent command behind one interface: propose(loop, n, flight)
    report.py      summary numbers, text report and progress plot of a results.tsv
    demo.py        the offline end-to-end demo in a disposable worktree

The hub that many loops share (agent_loop.py hub; program_hub.md):
    hub.py         the HTTP API (agenthub-compatible, starlette + uvicorn) and the read-only page at /
    hubstore.py    its data: SQLite (WAL) and a bare git repository; bundles checked in a scratch repository
    hubclient.py   the loop as a client (run --hub): results posted, keeps pushed, better commits tried here

Data, training and evaluation:
    attention.py   causal attention kernels behind one call, and the choice among them for a run
    cachefiles.py  the files prepare.py writes in its cache: shards, manifests, atomic writes, progress
    device.py      what differs between CUDA, MPS and CPU when measuring a run: FLOP/s, sync, memory
    download.py    the default climbmix dataset: parallel, resumable, verified shard download
    evaluator.py   val_bpb of the model train.py handed over, computed in a process of its own
    installed.py   the evaluator's code outside the repository (torch...) as at the tag's first evaluation
    fa3.py         loading Flash Attention 3 from the kernels hub (CUDA, Hopper), with a network probe
    handoff.py     the hand-over of a trained model (torch.export) from train.py to the evaluator
    memory.py      peak memory of a training step, counted on fake tensors before anything is allocated
    metricdata.py  the metric's files: hashed, kept read-only in .pristine/, checked and restored; the
                   evaluator's own sealed copy
    sources.py     --source: your own text files as a dataset, converted into parquet shards
    synthetic.py   a corpus generated offline in seconds, for machines without internet and for tests
    tokens.py      tokenizer training and pre-tokenizing into <split>.bin + offsets
"""
