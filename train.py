"""Fine-tune a LoRA adapter for one CEC stage on packed shared-prefix sequences.

    python train.py --stage concept --data train.jsonl --dev dev.jsonl --concepts codiesp-d50 --out runs/concept
    python train.py --stage label   --data train.jsonl --concepts codiesp-d50 --out runs/label
    torchrun --nproc_per_node 2 train.py --stage concept ...        (data parallel: gloo on CPU, nccl on CUDA)

Stages (paper Sec. 3.3, 3.4, Table 2): `concept` answers "is concept c relevant to the note" (Fig. 3), `label`
answers "does the patient have code y" given concept answers (Fig. 4), `direct` asks about code descriptions.
Defaults follow the paper's Appendix A: concept and direct r=32, alpha=32, dropout 0.05 on all linear layers;
label alpha=128 on k_proj and v_proj; gradient accumulation 4. One optimizer step takes --grad-accum notes per
process, each note with all its questions (so one step sees tens of question-answer pairs, not one).
The run folder gets the adapter (adapter_config.json + adapter_model.safetensors, PEFT's format; cec_adapter.json),
checkpoints/step-N/ for --resume, and train_log.jsonl (loss per step, dev loss/AUC/accuracy).

Notes files must be UTF-8, as JSON requires (a line that is not is an error naming the file and line). Bad input
(a missing or malformed file, an unknown code, weights or a checkpoint of another model) is one line on stderr and
exit status 2. A run killed at any point resumes from its last checkpoint with --resume and ends with the same
adapter; a loss that is not finite stops the run and names the last good checkpoint.
"""
# The command is cec/commands/train.py (installed as `cec-train`); this file keeps `python train.py` working.
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cec.commands.train import *  # noqa: E402,F401,F403  (the names tests and callers used from train.py)
from cec.commands.train import main  # noqa: E402

if __name__ == "__main__":
    from cec.cli import user_errors

    with user_errors("train.py"):
        main()
