"""`rlhfkit chat`: the conversation state, what reaches the model each turn, and a real terminal
session (pty) with streaming, commands, Ctrl-C and Ctrl-D. The tiny model's text is gibberish,
so the checks are on structure, never on content."""

import os
import sys
import time

import pexpect
import pytest

from rlhfkit.data.records import Message
from rlhfkit.serve import chat as chat_module
from rlhfkit.serve.chat import ChatConfig, Conversation, command, fit_context

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny_folder(tiny_tokenizer, tmp_path_factory):
    """The tiny model saved as a model folder: a chat process loads it in a second, where the
    built-in name would train its tokenizer again (~10 s)."""
    from rlhfkit.models import build_tiny_model, save_model

    folder = tmp_path_factory.mktemp("chat") / "tiny"
    save_model(build_tiny_model(tiny_tokenizer), tiny_tokenizer, folder)
    return str(folder)


def exchange(i: int) -> list[Message]:
    return [Message("user", f"question {i}"), Message("assistant", f"answer {i}")]


def test_commands_edit_the_conversation():
    conv = Conversation(system="Be kind.", turns=exchange(0))
    assert conv.messages()[0] == Message("system", "Be kind.") and len(conv.messages()) == 3
    assert command(conv, "/reset") and conv.turns == [] and conv.system == "Be kind."  # /reset keeps the system prompt
    conv.turns += exchange(1)
    assert command(conv, "/system Be brief.") and conv.system == "Be brief." and conv.turns == []
    assert command(conv, "/system") and conv.messages() == ()  # no system message at all
    assert "unknown command /nope" in command(conv, "/nope")
    assert command(conv, "/quit") is None


def test_fit_context_drops_oldest_exchanges_keeps_system_and_question(tiny_tokenizer):
    from rlhfkit.data.tokenize import prompt_ids

    turns = exchange(0) + exchange(1) + exchange(2) + [Message("user", "question 3")]
    conv = Conversation(system="sys", turns=list(turns))
    full, dropped = fit_context(conv, tiny_tokenizer, budget=None)
    assert dropped == 0 and full == prompt_ids(tiny_tokenizer, conv.messages())
    # A budget that holds the system prompt, the last exchange and the question, not more.
    budget = len(prompt_ids(tiny_tokenizer, (Message("system", "sys"), *turns[-3:])))
    ids, dropped = fit_context(conv, tiny_tokenizer, budget)
    assert dropped == 2 and len(ids) <= budget < len(full)
    assert conv.messages() == (Message("system", "sys"), *turns[-3:])
    # When the question alone is too long, nothing is dropped: the caller refuses the message.
    ids, dropped = fit_context(conv, tiny_tokenizer, budget=1)
    assert dropped == 0 and len(ids) > 1 and conv.messages() == (Message("system", "sys"), *turns[-3:])


def run_chat(monkeypatch, capsys, folder, lines, context=None, **flags):
    """Run chat() in-process on scripted input; returns the decoded prompt of every answer."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    inputs = iter(lines)
    prompts = []

    def fake_input(prompt=""):
        try:
            return next(inputs)
        except StopIteration:
            raise EOFError from None

    def fake_answer(answerer, tok, ids, cfg, max_new_tokens):
        prompts.append(tokenizer.decode(ids))
        return f"answer{len(prompts)}", ""

    monkeypatch.setattr("builtins.input", fake_input)
    monkeypatch.setattr(chat_module, "stream_answer", fake_answer)
    if context is not None:
        monkeypatch.setattr(chat_module, "context_length", lambda model: context)
    chat_module.chat(ChatConfig(model=folder, **flags))
    return prompts, capsys.readouterr().out


def test_history_reaches_the_model_and_reset_clears_it(monkeypatch, capsys, tiny_folder):
    prompts, out = run_chat(monkeypatch, capsys, tiny_folder,
                            ["first question", "second question", "/reset", "third question",
                             "/system Be brief.", "fourth question", "fifth question"], system="Be kind.")
    assert out.startswith(f"rlhfkit chat: {tiny_folder} | /reset")
    assert len(prompts) == 5
    assert "Be kind." in prompts[0] and "first question" in prompts[0]
    # turn 2 sees turn 1 and its answer, in order, then the new question
    second = prompts[1]
    assert second.index("first question") < second.index("answer1") < second.index("second question")
    # /reset: history gone, system prompt kept
    assert "first question" not in prompts[2] and "answer" not in prompts[2] and "Be kind." in prompts[2]
    # /system: new system prompt, history gone
    assert "Be brief." in prompts[3] and "Be kind." not in prompts[3] and "third question" not in prompts[3]
    assert "fourth question" in prompts[4] and "answer4" in prompts[4]


def test_long_conversation_drops_oldest_turns_and_says_so(monkeypatch, capsys, tiny_folder):
    long_turns = [f"question {i}: " + "tell me more about it " * 6 for i in range(6)]
    prompts, out = run_chat(monkeypatch, capsys, tiny_folder, long_turns, context=200, max_new_tokens=64)
    assert "dropped the oldest" in out and "200-token context" in out
    assert "question 0" not in prompts[-1] and "question 5" in prompts[-1]


def test_a_message_longer_than_the_context_is_not_sent(monkeypatch, capsys, tiny_folder):
    prompts, out = run_chat(monkeypatch, capsys, tiny_folder, ["hi", "word " * 300, "still here?"],
                            context=200, max_new_tokens=64)
    assert "message too long" in out and "not sent" in out
    assert len(prompts) == 2 and "word" not in prompts[1] and "answer1" in prompts[1]  # history intact


def test_stream_answer_prints_as_it_generates_and_ctrl_c_stops_it(monkeypatch, capsys, tiny_folder):
    """Ctrl-C reaches the main thread, which runs the decoder, as KeyboardInterrupt: the answer
    stops within a token or two and stream_answer returns normally (the program goes on)."""
    import signal

    from transformers import AutoTokenizer

    from rlhfkit.config import ModelConfig
    from rlhfkit.data.tokenize import prompt_ids
    from rlhfkit.generation import Answerer, Detokenizer
    from rlhfkit.models import load_model

    tokenizer = AutoTokenizer.from_pretrained(tiny_folder)
    model = load_model(ModelConfig(name=tiny_folder), tokenizer)
    answerer = Answerer(model, tokenizer)
    ids = prompt_ids(tokenizer, (Message("system", "Be brief."), Message("user", "hi")))
    cfg = ChatConfig(model=tiny_folder, temperature=0)

    text, note = chat_module.stream_answer(answerer, tokenizer, ids, cfg, max_new_tokens=12)
    out = capsys.readouterr().out
    assert note == "(cut at 12 tokens)" and text.strip() and out.startswith("model> ") and text in out

    class CtrlCAfterThreeTokens(Detokenizer):
        """Ctrl-C after the third generated token (counted as tokens, not text: the random tiny
        model's gibberish may hold a partial character)."""

        def add(self, token):
            if len(self.ids) == 3:
                os.kill(os.getpid(), signal.SIGINT)  # as the terminal does on Ctrl-C
            return super().add(token)

    monkeypatch.setattr(chat_module, "Detokenizer", CtrlCAfterThreeTokens)
    # As `chat` does: SIGINT must raise KeyboardInterrupt even if this test process inherited it
    # ignored (a background job of a non-interactive shell does).
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        text, note = chat_module.stream_answer(answerer, tokenizer, ids, cfg, max_new_tokens=900)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert note == "(stopped)"
    assert 0 < len(tokenizer(text, add_special_tokens=False)["input_ids"]) < 100  # not 900: generation stopped


def test_terminal_session(tiny_folder):
    """A real pty: streamed answers, commands, Ctrl-C during an answer and at the prompt, Ctrl-D.

    Greedy decoding of the random tiny model never emits the end-of-turn token, so each answer
    would run for 1000 tokens (seconds) unless Ctrl-C stops it. Its gibberish may hold no space,
    and the streamer holds text back until one, so the test waits a moment instead of for words.
    """
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "src"), TOKENIZERS_PARALLELISM="false")
    child = pexpect.spawn(sys.executable, ["-m", "rlhfkit.cli", "chat", tiny_folder, "--temperature", "0",
                                           "--max-new-tokens", "1000", "--system", "Be brief."],
                          env=env, encoding="utf-8", timeout=60, cwd=ROOT)
    child.expect(r"rlhfkit chat: .* /reset .* /system .* /quit")
    child.expect_exact("you> ")
    child.sendline("hi")
    child.expect_exact("model> ")
    time.sleep(0.5)  # generating: 1000 tokens take the tiny model seconds
    child.sendintr()
    child.expect_exact("(stopped)")
    child.expect_exact("you> ")
    child.sendline("/system Be very brief.")
    child.expect_exact("system prompt set to 'Be very brief.'")
    child.expect_exact("you> ")
    child.sendline("what is two plus two?")
    child.expect_exact("model> ")
    child.sendintr()
    child.expect_exact("(stopped)")
    child.expect_exact("you> ")
    child.sendline("/reset")
    child.expect_exact("history cleared")
    child.expect_exact("you> ")
    child.sendintr()  # at the prompt: clears the line and lists the commands
    child.expect_exact("Ctrl-D exits")
    child.expect_exact("you> ")
    child.sendeof()  # Ctrl-D
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0, child.before
