"""The messages between the fedlora ServerApp and ClientApp: types and the sections of their ``RecordDict``.

One run, as the server sees it:

    query.hello        -> every node: which partition are you, how many examples, what have you stored
    train.fedsb_init   -> Fed-SB (init_mode=federated), once: each client's gradient estimate G_k
    query.sync         -> every node: Fed-SB's frozen B, A and starting R (once)
    for each round:
        train          -> the selected clients: round and client id (+ whatever a stale client missed)
        query.sync     -> every node: this round's downlink (the merge, the client's truncated adapter, or R)

The downlink of round t goes to all K clients right after round t, as the in-process engine counts it (every
client's base must stay equal for FLoRA/FLoRIST); clients keep what they received in ``Context.state``
(merged steps, their start adapter, Fed-SB's frozen factors and R), which never leaves the node. A client that
missed syncs (it was down) gets the missing pieces with its next ``train`` message; those bytes are counted in
that round.
"""

HELLO = "query.hello"
SYNC = "query.sync"
TRAIN = "train"
FEDSB_INIT = "train.fedsb_init"

# Sections of a message's RecordDict
CONFIG = "config"  # ConfigRecord: round, client id, first_step
UPLOAD = "upload"  # ArrayRecord: the client's factors (or G_k)
REPORT = "report"  # ConfigRecord: the client's record (JSON) for metrics.jsonl
METRICS = "metrics"  # MetricRecord: numeric training metrics (Flower's convention)
START = "start"  # ArrayRecord: the adapter the client starts its next round from (B, A; B only for FFA-LoRA)
R = "R"  # ArrayRecord: Fed-SB's global R
FROZEN = "frozen"  # ArrayRecord: Fed-SB's shared B, A and the starting R
STEP = "step."  # ArrayRecord per merged step: "step.<index>" (FLoRA/FLoRIST merges, FedEx-LoRA residuals)

# Keys of the client's Context.state
STATE_META = "fedlora.meta"  # ConfigRecord: synced (round), steps (merged steps stored)
STATE_STEP = "fedlora.step."
STATE_START = "fedlora.start"
STATE_R = "fedlora.R"
STATE_FROZEN = "fedlora.frozen"
