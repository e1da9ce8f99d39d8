"""A student with another tokenizer, from cached teacher signals (METHODS §5).

- `vocab_map.py`: the byte-string vocabulary map M (teacher id -> student id), cached;
- `align.py`: aligned positions = identical character spans over the same text;
- `translate.py`: a store record in the student's tokens (runs in the data loader);
- `student_topk.py`: the student's own K largest log-probs, chunked (ULD);
- `setup.py`: the run's decision and its one-line refusals.
The ULD loss is `train/losses/uld.py`; kd/dckd/adpa keep their own loss files.
"""
