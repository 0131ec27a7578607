# flexdraft-jax. Every target sets up .venv on first use.
PY := .venv/bin/python
STAMP := .venv/.installed

.PHONY: install test demo bench clean

install: $(STAMP)

$(STAMP): requirements.txt requirements-nodeps.txt requirements-test.txt
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt -r requirements-test.txt
	$(PY) -m pip install -q --no-deps -r requirements-nodeps.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q --durations=15 tests

demo: $(STAMP)
	$(PY) decode.py --prompts_file=mtbench --num_prompts=3 --batch_size=1 --max_new_tokens=128 \
	  --stream --stats --compare_ar

bench: $(STAMP)
	$(PY) -m flexdraft_jax.bench --drafter=drafters/smollm2-135m-instruct \
	  --modes=ar,pld,parallel,sequential,flex --batch_sizes=1,4 \
	  --num_prompts=4 --max_new_tokens=32 --repeats=1 --compare_hf=false --unroll_layers=false \
	  --out_dir=bench_out

clean:
	rm -rf .venv bench_out
