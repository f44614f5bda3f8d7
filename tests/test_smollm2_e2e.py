"""The embedded default model, SmolLM2-135M-Instruct on vLLM, answers a factual question through zdyn."""

import pytest
from e2e import deployment

pytestmark = pytest.mark.slow


def test_default_model_answers_factual_questions(tmp_path):
    with deployment(tmp_path, None, worker_args=["--enforce-eager", "--max-model-len", "2048"]) as dep:
        assert dep.model == "SmolLM2-135M-Instruct"
        client = dep.client()
        capital = client.chat.completions.create(
            model=dep.model,
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=40,
            temperature=0,
        )
        assert "Paris" in capital.choices[0].message.content
        assert capital.choices[0].finish_reason == "stop"  # ends its turn by itself
        sums = client.chat.completions.create(
            model=dep.model, messages=[{"role": "user", "content": "What is 2+2?"}], max_tokens=30
        )  # the model's own sampling defaults (temperature 0.2, top_p 0.9)
        assert "4" in sums.choices[0].message.content
