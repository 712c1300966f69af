"""The LLM engine Triton runs (deploy/triton/llm/1/model.py is its thin wrapper): batched
generation and score mode over one copy of the base weights and any number of LoRA adapters, on
a runtime chosen by KS_ENGINE_RUNTIME. No service imports it: the infer and trainer services
reach it through Triton (services/llm/triton.py), with the request and result types of the LLM
contract (services/llm/llm.py) on both sides."""
