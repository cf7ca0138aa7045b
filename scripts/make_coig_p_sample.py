"""Write dsa/samples/coig_p_sample.jsonl: COIG-P-format preference pairs (Chinese and English) for the tests
and `dpo_train.py --preset tiny`. Deterministic: `uv run python scripts/make_coig_p_sample.py` rewrites the
same file.

Facts: a short factual question; the chosen reply answers it in the language of the question, the
rejected reply is one of three learnable failures: the same answer in the other language, a refusal, or
a degenerate repetition. A few prompts have a system turn or an earlier exchange, and about a third put
filler text before the question, so that prompts get longer than the tiny preset's k = 64 and sparse
attention differs from dense.
Recall: the user states their name, filler follows, then asks for it; chosen gives the stated name,
rejected another one (a long-range preference, which needs the attention to find the name).
"""

import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "dsa" / "samples" / "coig_p_sample.jsonl"

# (Chinese question, Chinese answer, English question, English answer)
FACTS = [
    ("天空是什么颜色的？", "晴天的天空是蓝色的。", "What color is the sky?", "On a clear day the sky is blue."),
    ("一周有几天？", "一周有七天。", "How many days are in a week?", "A week has seven days."),
    ("法国的首都是哪里？", "法国的首都是巴黎。", "What is the capital of France?", "The capital of France is Paris."),
    ("中国的首都是哪里？", "中国的首都是北京。", "What is the capital of China?", "The capital of China is Beijing."),
    ("日本的首都是哪里？", "日本的首都是东京。", "What is the capital of Japan?", "The capital of Japan is Tokyo."),
    ("水在多少度沸腾？", "在标准大气压下，水在一百摄氏度沸腾。", "At what temperature does water boil?", "At sea level, water boils at one hundred degrees Celsius."),
    ("太阳系最大的行星是哪颗？", "太阳系最大的行星是木星。", "What is the largest planet in the solar system?", "The largest planet in the solar system is Jupiter."),
    ("一年有几个月？", "一年有十二个月。", "How many months are in a year?", "A year has twelve months."),
    ("猫喜欢吃什么？", "猫喜欢吃鱼和肉。", "What do cats like to eat?", "Cats like to eat fish and meat."),
    ("草是什么颜色的？", "草是绿色的。", "What color is grass?", "Grass is green."),
    ("太阳从哪个方向升起？", "太阳从东方升起。", "Where does the sun rise?", "The sun rises in the east."),
    ("一天有多少小时？", "一天有二十四小时。", "How many hours are in a day?", "A day has twenty-four hours."),
    ("蜜蜂会制造什么？", "蜜蜂会制造蜂蜜。", "What do bees make?", "Bees make honey."),
    ("冰是由什么构成的？", "冰是冻结的水。", "What is ice made of?", "Ice is frozen water."),
    ("人有几只手？", "人有两只手。", "How many hands does a person have?", "A person has two hands."),
    ("月亮绕着什么转？", "月亮绕着地球转。", "What does the moon orbit?", "The moon orbits the Earth."),
    ("长城在哪个国家？", "长城在中国。", "In which country is the Great Wall?", "The Great Wall is in China."),
    ("鱼用什么呼吸？", "鱼用鳃呼吸。", "What do fish breathe with?", "Fish breathe with their gills."),
    ("香蕉是什么颜色的？", "成熟的香蕉是黄色的。", "What color is a banana?", "A ripe banana is yellow."),
    ("三角形有几条边？", "三角形有三条边。", "How many sides does a triangle have?", "A triangle has three sides."),
    ("植物需要什么来生长？", "植物需要阳光、水和空气来生长。", "What do plants need to grow?", "Plants need sunlight, water and air to grow."),
    ("冬天之后是什么季节？", "冬天之后是春天。", "Which season comes after winter?", "Spring comes after winter."),
    ("钢琴有多少个键？", "标准钢琴有八十八个键。", "How many keys does a piano have?", "A standard piano has eighty-eight keys."),
    ("地球上最大的海洋是哪个？", "地球上最大的海洋是太平洋。", "What is the largest ocean on Earth?", "The largest ocean on Earth is the Pacific Ocean."),
    ("蜘蛛有几条腿？", "蜘蛛有八条腿。", "How many legs does a spider have?", "A spider has eight legs."),
    ("英国的首都是哪里？", "英国的首都是伦敦。", "What is the capital of the United Kingdom?", "The capital of the United Kingdom is London."),
    ("雪是什么颜色的？", "雪是白色的。", "What color is snow?", "Snow is white."),
    ("一小时有多少分钟？", "一小时有六十分钟。", "How many minutes are in an hour?", "An hour has sixty minutes."),
    ("牛奶来自哪种动物？", "牛奶通常来自奶牛。", "Which animal gives us milk?", "Milk usually comes from cows."),
    ("鸟用什么飞行？", "鸟用翅膀飞行。", "What do birds use to fly?", "Birds use their wings to fly."),
    ("火星是什么颜色的？", "火星看起来是红色的。", "What color is Mars?", "Mars looks red."),
    ("正方形有几个角？", "正方形有四个角。", "How many corners does a square have?", "A square has four corners."),
    ("熊猫喜欢吃什么？", "熊猫喜欢吃竹子。", "What do pandas like to eat?", "Pandas like to eat bamboo."),
    ("彩虹有几种颜色？", "彩虹通常有七种颜色。", "How many colors does a rainbow have?", "A rainbow usually has seven colors."),
    ("意大利的首都是哪里？", "意大利的首都是罗马。", "What is the capital of Italy?", "The capital of Italy is Rome."),
    ("地球绕着什么转？", "地球绕着太阳转。", "What does the Earth orbit?", "The Earth orbits the Sun."),
]
REFUSALS = {
    "zh": ["抱歉，我无法回答这个问题。", "我不知道。", "这个问题我不想回答。"],
    "en": ["Sorry, I cannot answer that.", "I don't know.", "I would rather not answer this question."],
}
SYSTEM = {"zh": "你是一个乐于助人的助手。", "en": "You are a helpful assistant."}
FILLER = {  # the passkey filler (docs/method.md), and the tiny corpus's Chinese version of it
    "zh": "草是绿的。天是蓝的。太阳是黄的。我们走吧。去了又回来。",
    "en": "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ",
}
NAMES = {
    "zh": ["张伟", "王芳", "李娜", "刘洋", "陈静", "杨磊", "赵敏", "黄勇", "周杰", "吴霞", "徐明", "孙丽"],
    "en": ["Alice", "Bob", "Carol", "David", "Emma", "Frank", "Grace", "Henry", "Irene", "Jack", "Karen", "Leo"],
}
RECALL = {  # (statement, question, answer) templates
    "zh": ("我叫{}。", "我叫什么名字？", "你叫{}。"),
    "en": ("My name is {}. ", "What is my name?", "Your name is {}."),
}
GREETING = {  # an earlier exchange for multi-turn prompts
    "zh": ("你好！", "你好！有什么可以帮你的吗？"),
    "en": ("Hello!", "Hello! How can I help you?"),
}


def degenerate(answer: str, lang: str) -> str:
    """The first two words (English) or characters (Chinese) of the answer, repeated."""
    unit = answer[:2] if lang == "zh" else " ".join(answer.split()[:2]) + " "
    return (unit * 8).strip()


def pair(turns: list[dict], chosen: str, rejected: str) -> dict:
    return {"conversations": turns, "chosen": {"from": "gpt", "value": chosen}, "rejected": {"from": "gpt", "value": rejected}}


def fact_pairs(rng: random.Random):
    for zh_q, zh_a, en_q, en_a in FACTS:
        text = {"zh": (zh_q, zh_a), "en": (en_q, en_a)}
        for lang, other in (("zh", "en"), ("en", "zh")):
            question, answer = text[lang]
            rejected = [text[other][1], rng.choice(REFUSALS[lang]), degenerate(answer, lang)]
            for bad in rejected:
                shape = rng.random()
                filler = FILLER[lang] * rng.randint(1, 3) + "\n" if shape > 0.65 else ""
                turns = [{"from": "human", "value": filler + question}]
                if shape < 0.15:
                    turns = [{"from": "system", "value": SYSTEM[lang]}] + turns
                elif shape < 0.3:
                    hello, reply = GREETING[lang]
                    turns = [{"from": "human", "value": hello}, {"from": "gpt", "value": reply}] + turns
                yield pair(turns, answer, bad)


def recall_pairs(rng: random.Random, per_language: int = 24):
    for lang in ("zh", "en"):
        statement, question, answer = RECALL[lang]
        for _ in range(per_language):
            name, other = rng.sample(NAMES[lang], 2)
            prompt = statement.format(name) + FILLER[lang] * rng.randint(1, 3) + "\n" + question
            yield pair([{"from": "human", "value": prompt}], answer.format(name), answer.format(other))


def main():
    rng = random.Random(0)
    rows = list(fact_pairs(rng)) + list(recall_pairs(rng))
    rng.shuffle(rows)
    with open(OUT, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"wrote {len(rows)} pairs to {OUT}")


if __name__ == "__main__":
    main()
