"""Local lm-eval tasks written by tests (offline): a multiple-choice task and a loglikelihood task, YAML + JSONL."""

import json

MC_DOCS = [
    {"question": f"Q{i}: what comes after {w}?", "choices": [" one", " two", " three"], "answer": i % 3}
    for i, w in enumerate("abcdef")
]
LL_DOCS = [
    {"context": "To be, or not to", "continuation": " be"},
    {"context": "The quick brown fox", "continuation": " jumps over"},
    {"context": "Hello", "continuation": " world"},
]


def write_tasks(directory):
    """A multiple-choice task `local_mc` and a loglikelihood task `local_ll`: YAML + JSONL, read offline."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, docs in (("mc", MC_DOCS), ("ll", LL_DOCS)):
        (directory / f"{name}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    head = "dataset_path: json\ndataset_kwargs:\n  data_files: {{test: {data}}}\n  cache_dir: {cache}\ntest_split: test\n"
    (directory / "mc.yaml").write_text(
        "task: local_mc\n" + head.format(data=directory / "mc.jsonl", cache=directory / "hf")
        + 'output_type: multiple_choice\ndoc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\n'
        "doc_to_target: answer\nmetric_list:\n  - metric: acc\n"
    )
    (directory / "ll.yaml").write_text(
        "task: local_ll\n" + head.format(data=directory / "ll.jsonl", cache=directory / "hf")
        + 'output_type: loglikelihood\ndoc_to_text: "{{context}}"\ndoc_to_target: "{{continuation}}"\n'
        "metric_list:\n  - metric: perplexity\n  - metric: acc\n"
    )
    return directory
