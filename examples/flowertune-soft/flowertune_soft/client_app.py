"""flowertune-soft: A Flower / FlowerTune ClientApp whose uploads SOFT sparsifies."""

import os
import warnings

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.config import unflatten_dict
from peft import get_peft_model_state_dict, set_peft_model_state_dict

from fedsoft.dropin import soft_mod
from flowertune_soft.dataset import batches, load_data, replace_keys
from flowertune_soft.models import get_model, get_tokenizer, train_steps

# Avoid warnings
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ["RAY_DISABLE_DOCKER_CPU_WARNING"] = "1"
warnings.filterwarnings("ignore", category=UserWarning)
torch.set_num_threads(int(os.environ.get("FLOWERTUNE_THREADS", "1")))


# Flower ClientApp: soft_mod encodes the train reply (the server's SoftDecode decodes it)
app = ClientApp(mods=[soft_mod()])


@app.train()
def train(msg: Message, context: Context):
    """Train the model on local data."""
    # Parse config
    partition_id = context.node_config["partition-id"]
    num_partitions = context.node_config["num-partitions"]
    cfg = replace_keys(unflatten_dict(context.run_config))
    server_round = int(msg.content["config"]["server-round"])

    # Let's get the client partition
    trainset = load_data(partition_id, num_partitions, cfg["dataset"])
    tokenizer = get_tokenizer(cfg["model"]["name"])

    # Load the model and initialize it with the received weights
    model = get_model(cfg["model"], tokenizer)
    set_peft_model_state_dict(model, msg.content["arrays"].to_torch_state_dict())

    # Do local training (seeded per round and partition: dropout, batch order)
    seed = int(np.random.SeedSequence([cfg["model"].get("seed", 0), server_round,
                                       partition_id]).generate_state(1)[0])
    torch.manual_seed(seed)
    loader = batches(trainset, tokenizer, int(cfg["train"]["seq_length"]),
                     int(cfg["train"]["batch_size"]), shuffle_seed=seed)
    train_loss = train_steps(model, loader, float(cfg["train"]["learning_rate"]),
                             int(cfg["train"]["local_steps"]))

    # Construct and return reply Message
    model_record = ArrayRecord(get_peft_model_state_dict(model))
    metrics = {
        "train_loss": train_loss,
        "num-examples": len(trainset),
    }
    metric_record = MetricRecord(metrics)
    content = RecordDict({"arrays": model_record, "metrics": metric_record})
    return Message(content=content, reply_to=msg)
