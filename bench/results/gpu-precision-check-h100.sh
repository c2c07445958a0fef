set -e
python3 -c "from safetensors.torch import load_file, save_file; d=load_file('.gpu/minilm/model.safetensors'); save_file({k:v.float() for k,v in d.items()}, '.gpu/minilm/model.safetensors', metadata={'format':'pt'})"
export PYTHONPATH=src HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TRANSFORMERS_VERBOSITY=error EMBTUNE_CACHE=/tmp/cache
for p in "" "--bf16" "--fp16" "--bf16 --gradient-checkpointing"; do
  echo "== precision flags: '$p'"
  python3 -m embtune train --model .gpu/minilm --train-data .gpu/nq --train-group-size 8 --batch-size 10 --max-steps 20 --logging-steps 5 --save-steps 0 -o /tmp/out$RANDOM $p 2>&1 | grep -v "it/s\]\|step/s\]" | grep -E "embtune train|chance" | tail -3
done
python3 -m embtune train --model .gpu/minilm --train-data .gpu/nq --max-steps 3 --bf16 -o /tmp/stcheck > /dev/null 2>&1
python3 - <<'PY'
import torch
from sentence_transformers import SentenceTransformer
from embtune.models.encoder import Encoder
e = Encoder.from_pretrained("/tmp/stcheck").to("cuda")
texts = ["a short passage about cells", "another passage"]
ours = e.encode_passages(texts)
st = SentenceTransformer("/tmp/stcheck", device="cuda")
theirs = st.encode(texts, convert_to_tensor=True, prompt_name="document").float().cpu()
print("bf16-trained model: max |ours(bf16 autocast encode) - ST(fp32)| =", (ours - theirs).abs().max().item())
PY
