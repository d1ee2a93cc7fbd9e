"""flowertune-soft: A Flower / FlowerTune ServerApp that decodes SOFT-sparsified uploads."""

import json
import os
from datetime import datetime

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.common.config import unflatten_dict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from peft import get_peft_model_state_dict, set_peft_model_state_dict

from fedsoft.dropin import SoftDecode
from flowertune_soft.dataset import batches, load_test, replace_keys
from flowertune_soft.models import get_model, get_tokenizer, heldout_loss

torch.set_num_threads(int(os.environ.get("FLOWERTUNE_THREADS", "1")))

# Create ServerApp
app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Main entry point for the ServerApp."""
    # Output directory: run-dir, else results/<time> (FlowerTune's) under the cwd
    save_path = context.run_config.get("run-dir") or os.path.join(
        os.getcwd(), "results", datetime.now().strftime("%Y-%m-%d_%H-%M-%S"))
    os.makedirs(save_path, exist_ok=True)

    # Read from config
    num_rounds = context.run_config["num-server-rounds"]
    cfg = replace_keys(unflatten_dict(context.run_config))

    # Get initial model weights
    tokenizer = get_tokenizer(cfg["model"]["name"])
    init_model = get_model(cfg["model"], tokenizer)
    arrays = ArrayRecord(get_peft_model_state_dict(init_model))

    # Define strategy: FlowerTune's FedAvg, wrapped so that it receives full weights
    strategy = SoftDecode(
        FedAvg(
            fraction_train=cfg["strategy"]["fraction_train"],
            fraction_evaluate=cfg["strategy"]["fraction_evaluate"],
        ),
        sparsity=cfg["fedsoft"]["sparsity"],
        wire_dtype=cfg["fedsoft"]["wire_dtype"],
    )

    # Start strategy, run FedAvg for `num_rounds`
    result = strategy.start(
        grid=grid,
        initial_arrays=arrays,
        train_config=ConfigRecord({"save_path": save_path}),
        num_rounds=num_rounds,
        evaluate_fn=get_evaluate_fn(cfg, num_rounds, save_path),
    )

    # One line per round: held-out loss and the uplink as Flower counted it
    with open(os.path.join(save_path, "metrics.jsonl"), "w") as fh:
        for rnd in range(num_rounds + 1):
            row = {"round": rnd}
            row.update(dict(result.evaluate_metrics_serverapp.get(rnd, {})))
            row.update(dict(result.train_metrics_clientapp.get(rnd, {})))
            fh.write(json.dumps(row) + "\n")


# Get function that will be executed by the strategy
# Here we use it to compute the held-out loss and save the final adapter
def get_evaluate_fn(cfg, total_round, save_path):
    """Return an evaluation function: held-out loss, adapter saved after the last round."""
    tokenizer = get_tokenizer(cfg["model"]["name"])
    test = batches(load_test(cfg["dataset"]), tokenizer, int(cfg["train"]["seq_length"]),
                   int(cfg["train"]["batch_size"]))

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model = get_model(cfg["model"], tokenizer)
        set_peft_model_state_dict(model, arrays.to_torch_state_dict())
        loss = heldout_loss(model, test)
        if server_round == total_round:
            model.save_pretrained(os.path.join(save_path, "adapter"))
        return MetricRecord({"heldout_loss": loss})

    return evaluate
