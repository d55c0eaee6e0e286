"""The data side of the RL loop: prompt sets in, rewards out.

    datasets.py   JSONL / Parquet prompt files -> chat-templated prompt ids (bad rows counted, never fatal),
                  and a seeded, resumable sampler of shuffled epochs
    rewards.py    math answer checking with math-verify, plug-in reward functions, batch scoring that
                  turns a failing reward into 0.0 and a count
    buffer.py     rollout groups with bounded staleness (async mode)
    toy_task.py   the quickstart's task, built offline: tokenizer, tiny model, prompts
"""
