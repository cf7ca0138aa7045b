"""Write the bundled sample data: synthetic conversations in the deepctrl-sft-data schema.

    uv run python scripts/make_samples.py     # rewrites dsa/samples/sft_*.jsonl (deterministic: fixed seeds)

Files in dsa/samples/ (one JSON object per line; fields as in deepctrl/deepctrl-sft-data):
  sft_sample_en.jsonl, sft_sample_zh.jsonl   training conversations, English and Chinese
  sft_heldout.jsonl                          held-out conversations of both languages (other seed)

Every conversation carries a long-range dependency, so that learned sparse attention has something to
find: a fact stated early (a name, a city, a number, a pass key, the content of a box) and asked for
later, after unrelated turns or filler text. Three kinds:
  facts    multi-turn chat: the user introduces themself, small talk follows, a later turn asks for a fact.
  boxes    key-value recall: "The red box holds 4821." for several boxes, filler sentences, a question.
  passkey  the standard pass-key retrieval text (docs/method.md, evaluation protocols): filler, the needle at a random
           depth, filler, "What is the pass key?".
"""

import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "dsa" / "samples"

EN = {
    "names": ["Alice", "Bob", "Carol", "David", "Emma", "Frank", "Grace", "Henry", "Irene", "Jack", "Karen",
              "Leo", "Maria", "Nathan", "Olivia", "Peter", "Quinn", "Rosa", "Sam", "Tina", "Victor", "Wendy"],
    "cities": ["Paris", "London", "Tokyo", "Berlin", "Madrid", "Rome", "Cairo", "Lima", "Oslo", "Seoul",
               "Sydney", "Toronto", "Dublin", "Vienna", "Prague", "Lisbon"],
    "pets": ["dog", "cat", "parrot", "rabbit", "hamster", "turtle"],
    "pet_names": ["Max", "Luna", "Coco", "Rocky", "Bella", "Milo", "Daisy", "Oscar", "Ruby", "Toby"],
    "colours": ["red", "blue", "green", "yellow", "black", "white", "purple", "orange", "pink", "brown"],
    "capitals": [("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Spain", "Madrid"),
                 ("Egypt", "Cairo"), ("Peru", "Lima"), ("Norway", "Oslo"), ("Germany", "Berlin"),
                 ("Austria", "Vienna"), ("Ireland", "Dublin"), ("Portugal", "Lisbon"), ("Canada", "Ottawa")],
    "things": [("the sky", "blue"), ("grass", "green"), ("snow", "white"), ("a banana", "yellow"),
               ("coal", "black"), ("a tomato", "red"), ("an orange", "orange"), ("chocolate", "brown")],
    "opposites": [("hot", "cold"), ("big", "small"), ("fast", "slow"), ("up", "down"), ("old", "new"),
                  ("happy", "sad"), ("early", "late"), ("light", "dark")],
    "sounds": [("a cow", "moo"), ("a dog", "woof"), ("a cat", "meow"), ("a duck", "quack"),
               ("a sheep", "baa"), ("an owl", "hoot")],
    "words": ["apple", "river", "stone", "cloud", "bread", "music", "garden", "window", "candle", "mirror"],
    "filler": "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ",
}

ZH = {
    "names": ["张伟", "王芳", "李娜", "刘洋", "陈静", "杨磊", "赵敏", "黄勇", "周杰", "吴霞", "徐明", "孙丽",
              "马超", "朱琳", "胡斌", "郭涛"],
    "cities": ["北京", "上海", "广州", "深圳", "杭州", "成都", "武汉", "西安", "南京", "重庆", "天津", "苏州"],
    "pets": ["狗", "猫", "鹦鹉", "兔子", "仓鼠", "乌龟"],
    "pet_names": ["旺财", "咪咪", "豆豆", "球球", "花花", "小白", "点点", "毛毛"],
    "colours": ["红", "蓝", "绿", "黄", "黑", "白", "紫", "橙"],
    "capitals": [("法国", "巴黎"), ("日本", "东京"), ("意大利", "罗马"), ("西班牙", "马德里"), ("埃及", "开罗"),
                 ("德国", "柏林"), ("英国", "伦敦"), ("俄罗斯", "莫斯科"), ("韩国", "首尔"), ("泰国", "曼谷")],
    "things": [("天空", "蓝色"), ("草", "绿色"), ("雪", "白色"), ("香蕉", "黄色"), ("煤", "黑色"), ("西红柿", "红色")],
    "opposites": [("热", "冷"), ("大", "小"), ("快", "慢"), ("上", "下"), ("新", "旧"), ("高", "矮"),
                  ("早", "晚"), ("黑", "白")],
    "sounds": [("牛", "哞哞"), ("狗", "汪汪"), ("猫", "喵喵"), ("鸭子", "嘎嘎"), ("羊", "咩咩")],
    "words": ["苹果", "河流", "石头", "白云", "面包", "音乐", "花园", "窗户", "蜡烛", "镜子"],
    "filler": "草是绿的。天是蓝的。太阳是黄的。我们走吧。去了又回来。",
}


def number(rng: random.Random) -> str:
    return str(rng.randint(10, 99999))


def small_talk_en(rng: random.Random) -> tuple[str, str]:
    """One unrelated question and its answer."""
    kind = rng.randrange(6)
    if kind == 0:
        country, capital = rng.choice(EN["capitals"])
        return f"What is the capital of {country}?", f"The capital of {country} is {capital}."
    if kind == 1:
        thing, colour = rng.choice(EN["things"])
        return f"What colour is {thing}?", f"{thing[0].upper() + thing[1:]} is {colour}."
    if kind == 2:
        word, opposite = rng.choice(EN["opposites"])
        return f"What is the opposite of {word}?", f"The opposite of {word} is {opposite}."
    if kind == 3:
        animal, sound = rng.choice(EN["sounds"])
        return f"What sound does {animal} make?", f"{animal[0].upper() + animal[1:]} says {sound}."
    if kind == 4:
        start = rng.randint(1, 90)
        end = start + rng.randint(3, 8)
        return f"Count from {start} to {end}.", ", ".join(str(i) for i in range(start, end + 1)) + "."
    word = rng.choice(EN["words"])
    return f"Repeat this word three times: {word}.", f"{word} {word} {word}."


def small_talk_zh(rng: random.Random) -> tuple[str, str]:
    kind = rng.randrange(6)
    if kind == 0:
        country, capital = rng.choice(ZH["capitals"])
        return f"{country}的首都是哪里？", f"{country}的首都是{capital}。"
    if kind == 1:
        thing, colour = rng.choice(ZH["things"])
        return f"{thing}是什么颜色？", f"{thing}是{colour}的。"
    if kind == 2:
        word, opposite = rng.choice(ZH["opposites"])
        return f"“{word}”的反义词是什么？", f"“{word}”的反义词是“{opposite}”。"
    if kind == 3:
        animal, sound = rng.choice(ZH["sounds"])
        return f"{animal}怎么叫？", f"{animal}{sound}叫。"
    if kind == 4:
        start = rng.randint(1, 90)
        end = start + rng.randint(3, 8)
        return f"从{start}数到{end}。", "，".join(str(i) for i in range(start, end + 1)) + "。"
    word = rng.choice(ZH["words"])
    return f"把这个词重复三遍：{word}。", f"{word}{word}{word}。"


def facts_en(rng: random.Random):
    name, city, num = rng.choice(EN["names"]), rng.choice(EN["cities"]), number(rng)
    pet, pet_name = rng.choice(EN["pets"]), rng.choice(EN["pet_names"])
    intro = (f"Hi! My name is {name}. I live in {city}, my favourite number is {num}, "
             f"and I have a {pet} called {pet_name}.")
    history = [[intro, f"Nice to meet you, {name}! I will remember that."]]
    history += [list(small_talk_en(rng)) for _ in range(rng.randint(3, 9))]
    question, answer = rng.choice([
        ("What is my name?", f"Your name is {name}."),
        ("Which city do I live in?", f"You live in {city}."),
        ("What is my favourite number?", f"Your favourite number is {num}."),
        (f"What is the name of my {pet}?", f"Your {pet} is called {pet_name}."),
    ])
    return "", question, answer, history


def facts_zh(rng: random.Random):
    name, city, num = rng.choice(ZH["names"]), rng.choice(ZH["cities"]), number(rng)
    pet, pet_name = rng.choice(ZH["pets"]), rng.choice(ZH["pet_names"])
    intro = f"你好！我叫{name}，住在{city}，我最喜欢的数字是{num}，我有一只{pet}叫{pet_name}。"
    history = [[intro, f"很高兴认识你，{name}！我会记住的。"]]
    history += [list(small_talk_zh(rng)) for _ in range(rng.randint(3, 9))]
    question, answer = rng.choice([
        ("我叫什么名字？", f"你叫{name}。"),
        ("我住在哪个城市？", f"你住在{city}。"),
        ("我最喜欢的数字是多少？", f"你最喜欢的数字是{num}。"),
        (f"我的{pet}叫什么名字？", f"你的{pet}叫{pet_name}。"),
    ])
    return "", question, answer, history


def boxes_en(rng: random.Random):
    colours = rng.sample(EN["colours"], rng.randint(3, 6))
    contents = {colour: number(rng) for colour in colours}
    facts = " ".join(f"The {colour} box holds {num}." for colour, num in contents.items())
    filler = " ".join(f"{t[0].upper() + t[1:]} is {c}." for t, c in rng.choices(EN["things"], k=rng.randint(10, 40)))
    asked = rng.choice(colours)
    text = f"{facts} {filler} Which number does the {asked} box hold?"
    return "Remember the boxes and answer the question at the end.", text, f"The {asked} box holds {contents[asked]}.", []


def boxes_zh(rng: random.Random):
    colours = rng.sample(ZH["colours"], rng.randint(3, 6))
    contents = {colour: number(rng) for colour in colours}
    facts = "".join(f"{colour}盒子里装着{num}。" for colour, num in contents.items())
    filler = "".join(f"{t}是{c}的。" for t, c in rng.choices(ZH["things"], k=rng.randint(10, 40)))
    asked = rng.choice(colours)
    text = f"{facts}{filler}{asked}盒子里装着多少？"
    return "记住每个盒子里的数字，然后回答最后的问题。", text, f"{asked}盒子里装着{contents[asked]}。", []


def passkey_en(rng: random.Random):
    key = str(rng.randint(1, 99999))
    needle = f"The pass key is {key}. Remember it. {key} is the pass key. "
    n_filler = rng.randint(3, 16)
    depth = rng.randint(0, n_filler)
    text = EN["filler"] * depth + needle + EN["filler"] * (n_filler - depth) + "What is the pass key?"
    instruction = "There is important info hidden inside a lot of irrelevant text. Find it and memorize it."
    return instruction, text, f"The pass key is {key}.", []


def passkey_zh(rng: random.Random):
    key = str(rng.randint(1, 99999))
    needle = f"密码是{key}。记住它。{key}就是密码。"
    n_filler = rng.randint(3, 16)
    depth = rng.randint(0, n_filler)
    text = ZH["filler"] * depth + needle + ZH["filler"] * (n_filler - depth) + "密码是多少？"
    return "在大量无关的文字中藏着重要信息。找到并记住它。", text, f"密码是{key}。", []


def copy_en(rng: random.Random):
    digits = "".join(rng.choice("0123456789") for _ in range(rng.randint(6, 30)))
    return "", f"Repeat this number exactly: {digits}", digits, []


def copy_zh(rng: random.Random):
    digits = "".join(rng.choice("0123456789") for _ in range(rng.randint(6, 30)))
    return "", f"请准确重复这个数字：{digits}", digits, []


KINDS = {"en": [facts_en, boxes_en, passkey_en, copy_en], "zh": [facts_zh, boxes_zh, passkey_zh, copy_zh]}


def record(rng: random.Random, language: str, index: int) -> dict:
    kind = rng.choice(KINDS[language])
    instruction, text, output, history = kind(rng)
    return {
        "id": index,
        "instruction": instruction,
        "input": text,
        "output": output,
        "history": history,
        "language": language,
        "data_source": "dsa_reproduce_synthetic",
        "input_len": len(instruction) + len(text),
        "output_len": len(output),
        "num_utter": len(history) + 1,
        "type": kind.__name__.split("_")[0],
        "type_keyword": ["long-range recall"],
    }


def write(path: Path, records: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def main(out: Path = OUT, n_train: int = 1200, n_heldout: int = 100) -> None:
    for language, seed in (("en", 1), ("zh", 2)):
        rng = random.Random(seed)
        write(out / f"sft_sample_{language}.jsonl", [record(rng, language, i) for i in range(n_train)])
    rng = random.Random(3)
    write(out / "sft_heldout.jsonl", [record(rng, ("en", "zh")[i % 2], i) for i in range(n_heldout)])


if __name__ == "__main__":
    main()
