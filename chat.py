"""
The chat format, in one place: conversations from JSON lines, rendered to token ids plus a loss mask, and
packed into training windows; preference pairs for DPO and its loss. train.py (SFT, DPO), sample.py (--chat),
eval.py (--tasks) and export.py use it.

A conversation is a list of {"role": "system" | "user" | "assistant", "content": str}. Rendered, each message is

    <|role|> content <|end|>

with the four markers reserved in the tokenizer (tokenizer.CHAT_TOKENS), so no text ever produces them: a literal
"<|user|>" in a message is encoded as plain text. Only assistant content and its <|end|> train (mask 1). To
generate a reply, the prompt ends with <|assistant|> and decoding stops at <|end|>. CHAT_TEMPLATE is the same
format in Jinja, for the Hugging Face and GGUF exports, which render a conversation to a string and then parse the
markers out of it: so that a literal marker in a message stays text there too, the template escapes "<|" in every
message (MARKER_ESCAPE). The Hugging Face export's tokenizer undoes the escape before BPE (export.py): its
apply_chat_template gives these ids for any text. llama.cpp cannot undo it: there the escaped marker is text too,
but spelled with the escape's bytes.

A preference pair (DPO) is a prompt and two replies to it, chosen and rejected; each is scored as the prompt
rendered up to <|assistant|>, then the reply and its <|end|>, on which alone the log-probability is summed.
"""
import bisect
import json

import numpy as np
import torch

ROLES = ('system', 'user', 'assistant')
# U+FFFF, a Unicode noncharacter (reserved for a program's internal use): "<|" in a message is written "<\uffff|", so
# no marker's text survives in it, and U+FFFF itself doubled, so that the escape can be undone exactly
MARKER_ESCAPE = '\uffff'
CHAT_TEMPLATE = ("{% for message in messages %}{{ '<|' + message['role'] + '|>' + (message['content'] | "
                 "replace('\uffff', '\uffff\uffff') | replace('<|', '<\uffff|')) + '<|end|>' }}"
                 "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")


def require_chat(tok, model_vocab_size=None):
    """The tokenizer's chat ids; a one-line error if it has none or the model cannot embed them."""
    if tok.chat is None:
        raise SystemExit('error: this tokenizer reserves no chat tokens (a BPE prepared before they were '
                         'added): prepare the data again and pre-train, or fine-tune a newer model')
    if model_vocab_size is not None and max(tok.chat.values()) >= model_vocab_size:
        raise SystemExit(f'error: the model\'s {model_vocab_size:,} token embeddings do not reach the chat tokens '
                         f'(ids {min(tok.chat.values())}..{max(tok.chat.values())}): it was not instruction-tuned')
    return tok.chat


def render(messages, tok, add_generation_prompt=False, encoded=None):
    """Token ids of a conversation and a same-length mask: 1 where the model learns (assistant content and
    its <|end|>), 0 elsewhere. With add_generation_prompt, ends with <|assistant|> for the reply to follow.
    encoded: the messages' contents already encoded (pack encodes all conversations in one batch)."""
    chat = require_chat(tok)
    ids, mask = [], []
    for i, m in enumerate(messages):
        content = encoded[i] if encoded is not None else tok.encode(m['content'])
        trains = int(m['role'] == 'assistant')
        ids += [chat[m['role']]] + content + [chat['end']]
        mask += [0] + [trains] * (len(content) + 1)
    if add_generation_prompt:
        ids.append(chat['assistant'])
        mask.append(0)
    return ids, mask


def check_messages(messages):
    """None if messages is a valid conversation to train on, else what is wrong with it."""
    problem = check_turns(messages)
    if problem:
        return problem
    for i, m in enumerate(messages):
        if m['role'] == 'assistant' and not m['content'].strip():
            return f'message {i} is an empty assistant turn'
    if not any(m['role'] == 'assistant' for m in messages):
        return 'no assistant turn: nothing to learn from'
    return None


def check_turns(messages):
    if not isinstance(messages, list) or not messages:
        return '"messages" must be a non-empty list'
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get('content'), str):
            return f'message {i} needs a "role" and a string "content"'
        if m.get('role') not in ROLES:
            return f'message {i} has role {m.get("role")!r}; expected one of {", ".join(ROLES)}'
    return None


def conversation_problem(record):
    """None if record is a conversation (a "prompt" and "response" become its "messages"), else what is wrong."""
    if 'messages' not in record:
        if not (isinstance(record.get('prompt'), str) and isinstance(record.get('response'), str)):
            return 'needs "messages", or "prompt" and "response" strings'
        record['messages'] = [{'role': 'user', 'content': record['prompt']},
                              {'role': 'assistant', 'content': record['response']}]
    return check_messages(record['messages'])


def pair_problem(record):
    """None if record is a preference pair (a "prompt" becomes its "messages": the conversation before the reply),
    else what is wrong."""
    if 'messages' not in record:
        if not isinstance(record.get('prompt'), str) or not record['prompt'].strip():
            return 'needs "messages" or a non-empty "prompt" string, and "chosen" and "rejected"'
        record['messages'] = [{'role': 'user', 'content': record['prompt']}]
    for key in ('chosen', 'rejected'):
        if not isinstance(record.get(key), str) or not record[key].strip():
            return f'"{key}" must be a non-empty string'
    if record['chosen'] == record['rejected']:  # a zero margin forever: the pair teaches nothing
        return '"chosen" and "rejected" are the same text'
    problem = check_turns(record['messages'])
    if not problem and record['messages'][-1]['role'] != 'user':
        problem = 'the last message of the prompt must be the user\'s: the reply answers it'
    return problem


def read_jsonl(path, problem_of, skip_bad=False):
    """The records of a JSON lines file that problem_of (which may complete them) finds nothing wrong with. A bad
    line is a one-line error naming the file and line, or with skip_bad is skipped and counted.
    Returns (records, number skipped)."""
    records, skipped = [], 0
    try:
        lines = open(path, encoding='utf-8').read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise SystemExit(f'error: cannot read {path}: {e}')
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            problem = None if isinstance(record, dict) else 'not a JSON object'
        except json.JSONDecodeError as e:
            record, problem = None, f'not JSON ({e.msg})'
        problem = problem or problem_of(record)
        if problem:
            if not skip_bad:
                raise SystemExit(f'error: {path}:{n}: {problem} (--skip_bad skips such lines)')
            skipped += 1
            continue
        records.append(record)
    return records, skipped


def read_conversations(path, skip_bad=False):
    """The conversations of a JSON lines file: each line {"messages": [...]} or {"prompt": str, "response": str}
    (other keys are kept, e.g. a task's options). Returns (records with a "messages" list, number skipped)."""
    return read_jsonl(path, conversation_problem, skip_bad)


def read_pairs(path, skip_bad=False):
    """The preference pairs of a JSON lines file: each line {"prompt": str or "messages": [...], "chosen": str,
    "rejected": str}, the two replies different. Returns (records with a "messages" list, number skipped)."""
    return read_jsonl(path, pair_problem, skip_bad)


def is_pairs(path):
    """Whether a JSON lines file holds preference pairs rather than conversations, by its first record's keys."""
    try:
        with open(path, encoding='utf-8') as f:
            first = next((line for line in f if line.strip()), '')
        record = json.loads(first)
        return isinstance(record, dict) and 'chosen' in record
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False  # read_conversations then names the problem


def pack(conversations, tok, block_size, seed=0):
    """Packs rendered conversations, whole, into windows of block_size + 1 tokens (best fit, longest first) rather
    than padding each to block_size: a step then computes on real tokens, as in pre-training. Returns x, y
    (windows, block_size) int64 arrays, y = the next token where it trains else -1, and counts. A conversation
    longer than a window keeps its first block_size + 1 tokens if any of them train, else it is dropped.
    Conversations sharing a window can attend to one another, as documents do in pre-training."""
    T = block_size + 1
    rendered, stats = [], dict(conversations=len(conversations), truncated=0, dropped=0)
    encoded = iter(tok.encode_batch([m['content'] for messages in conversations for m in messages]))
    for messages in conversations:
        ids, mask = render(messages, tok, encoded=[next(encoded) for _ in messages])
        if len(ids) > T:
            ids, mask = ids[:T], mask[:T]
            if not any(mask[1:]):
                stats['dropped'] += 1
                continue
            stats['truncated'] += 1
        rendered.append((ids, mask))
    order = np.random.default_rng(seed).permutation(len(rendered))  # ties broken by a seed, not by file order
    order = sorted(order.tolist(), key=lambda i: -len(rendered[i][0]))
    bins, free = [], []  # free: sorted (room left, bin index)
    for i in order:
        n = len(rendered[i][0])
        k = bisect.bisect_left(free, (n, -1))  # the fullest window it still fits in
        if k == len(free):
            bins.append([i])
            bisect.insort(free, (T - n, len(bins) - 1))
        else:
            room, b = free.pop(k)
            bins[b].append(i)
            bisect.insort(free, (room - n, b))
    x = np.full((len(bins), block_size), tok.eos_id, dtype=np.int64)  # padding: after the real tokens, never seen
    y = np.full((len(bins), block_size), -1, dtype=np.int64)
    for b, members in enumerate(bins):
        ids = [t for i in members for t in rendered[i][0]]
        mask = np.array([m for i in members for m in rendered[i][1]], dtype=bool)
        ids = np.array(ids, dtype=np.int64)
        x[b, :len(ids) - 1] = ids[:-1]
        y[b, :len(ids) - 1] = np.where(mask[1:], ids[1:], -1)
    stats.update(windows=len(bins), tokens=sum(len(r[0]) for r in rendered), trained=int((y != -1).sum()),
                 fill=sum(len(r[0]) for r in rendered) / max(1, len(bins) * T))
    return x, y, stats


def render_pair(messages, chosen, rejected, tok):
    """Token ids and masks of a prompt followed by each reply: [(ids, mask) of chosen, (ids, mask) of rejected].
    The mask is 1 on the reply's content and its <|end|> only: no prompt token counts, not even an earlier
    assistant turn of the prompt, and the two replies are scored on the same prompt."""
    prompt, _ = render(messages, tok, add_generation_prompt=True)
    rendered = []
    for reply in (chosen, rejected):
        ids = tok.encode(reply) + [tok.chat['end']]
        rendered.append((prompt + ids, [0] * len(prompt) + [1] * len(ids)))
    return rendered


def pair_windows(records, tok, block_size):
    """The preference pairs as x, y (pairs, 2, block_size) int64 arrays, [:, 0] chosen and [:, 1] rejected; y is
    the next token where it is the reply's, else -1. A pair either of whose sequences is longer than block_size + 1
    tokens is dropped (and counted) rather than cut: a cut reply's summed log-probability is not comparable."""
    T = block_size + 1
    kept, dropped = [], 0
    for r in records:
        pair = render_pair(r['messages'], r['chosen'], r['rejected'], tok)
        if max(len(ids) for ids, _ in pair) > T:
            dropped += 1
        else:
            kept.append(pair)
    x = np.full((len(kept), 2, block_size), tok.eos_id, dtype=np.int64)  # padding: after the real tokens
    y = np.full((len(kept), 2, block_size), -1, dtype=np.int64)
    for p, pair in enumerate(kept):
        for s, (ids, mask) in enumerate(pair):
            ids, mask = np.array(ids, dtype=np.int64), np.array(mask, dtype=bool)
            x[p, s, :len(ids) - 1] = ids[:-1]
            y[p, s, :len(ids) - 1] = np.where(mask[1:], ids[1:], -1)
    return x, y, dict(pairs=len(records), dropped=dropped, trained=int((y != -1).sum()))


def dpo_loss(logps, ref_logps, beta):
    """DPO (Rafailov et al. 2023): the mean of -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))) over pairs,
    from (pairs, 2) summed reply log-probabilities [chosen, rejected] under the policy (pi) and the reference
    (ref). A reward is beta * (pi - ref). Returns the loss and, detached, its log's stats (DPO_STATS): a tie
    counts half in the accuracy, so the start (policy = reference) reads 0.5, no preference."""
    rewards = beta * (logps.float() - ref_logps.float())
    margin = rewards[:, 0] - rewards[:, 1]
    loss = -torch.nn.functional.logsigmoid(margin).mean()
    accuracy = (margin > 0).float() + 0.5 * (margin == 0).float()
    stats = torch.stack([loss, rewards[:, 0].mean(), rewards[:, 1].mean(), accuracy.mean(), margin.mean()])
    return loss, stats.detach()


DPO_STATS = ('loss', 'rewards_chosen', 'rewards_rejected', 'reward_accuracy', 'margin')
