"""`make demo`: the engine answers entity-matching questions with the embedded SmolLM2 model."""
import time

from engine import LLM

QUESTIONS = [
    ("Product A is name: sony bravia 40 inch lcd tv. price: 899. Product B is name: sony 40in bravia lcd "
     "television. price: 879.99. Are Product A and Product B the same? Answer Yes or No."),
    ("Product A is name: canon powershot sd1100 is digital camera. Product B is name: nikon coolpix s550 "
     "digital camera. Are Product A and Product B the same? Answer Yes or No."),
    "What is the capital of France? Answer in one word.",
]


def main() -> None:
    llm = LLM.from_pretrained("smollm2-135m")
    t0 = time.perf_counter()
    answers = llm.generate_text(QUESTIONS, max_new_tokens=8, chat=True, stop="\n")
    dt = time.perf_counter() - t0
    for q, a in zip(QUESTIONS, answers):
        print(f"Q: {q}\nA: {a.strip()}\n")
    s = llm.last_stats
    print(f"{s['new_tokens']} new tokens in {dt:.2f} s; prefill {s['prefill_s']:.2f} s, decode {s['decode_s']:.2f} s")


if __name__ == "__main__":
    main()
