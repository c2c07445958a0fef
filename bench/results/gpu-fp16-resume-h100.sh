python3 -c "from safetensors.torch import load_file, save_file; d=load_file('.gpu/minilm/model.safetensors'); save_file({k:v.float() for k,v in d.items()}, '.gpu/minilm/model.safetensors', metadata={'format':'pt'})"
export PYTHONPATH=src HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TRANSFORMERS_VERBOSITY=error EMBTUNE_CACHE=/tmp/cache
A="--model .gpu/minilm --train-data .gpu/nq --train-group-size 8 --batch-size 5 --max-steps 6 --logging-steps 1 --save-steps 2 --fp16 --seed 3"
python3 -m embtune train $A -o /tmp/full > /tmp/full.log 2>&1; echo "uninterrupted rc=$?"
EMBTUNE_TEST_KILL_AT_STEP=3 python3 -m embtune train $A -o /tmp/killed > /tmp/k1.log 2>&1; echo "killed rc=$?"
python3 -m embtune train $A -o /tmp/killed --resume > /tmp/k2.log 2>&1; echo "resumed rc=$?"; tail -3 /tmp/k2.log
python3 - <<'PY'
import json, torch
from safetensors.torch import load_file
a=[json.loads(l) for l in open('/tmp/full/train_log.jsonl')]; b=[json.loads(l) for l in open('/tmp/killed/train_log.jsonl')]
print("losses uninterrupted", [round(r['loss'],6) for r in a if 'loss' in r])
print("losses killed+resumed", [round(r['loss'],6) for r in b if 'loss' in r])
x=load_file('/tmp/full/model.safetensors'); y=load_file('/tmp/killed/model.safetensors')
print("max |param diff|", max((x[k].float()-y[k].float()).abs().max().item() for k in x))
PY
