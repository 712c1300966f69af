"""The LLM contract both the infer and the trainer service use, owned by neither: request and
result types, prompts and chat encoding (so training prompts are the served ones), the Triton
client, the answer-agreement metric and the prompt settings both read."""
