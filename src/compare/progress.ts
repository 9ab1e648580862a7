/**
 * Progress of a compare run on stderr: a cli-progress bar when stderr is a terminal, plain
 * lines otherwise (CI logs, pipes), nothing when silenced (library use, tests).
 */
import { SingleBar, Presets } from 'cli-progress';

export interface Progress {
  /** starts a run of `total` steps */
  start(total: number): void;
  /** a new step begins */
  step(label: string): void;
  /** detail inside the current step (e.g. "42%"); cheap to call often */
  detail(text: string): void;
  /** a line that must stay visible (warnings) */
  note(text: string): void;
  stop(): void;
}

export const silentProgress: Progress = {
  start() {},
  step() {},
  detail() {},
  note() {},
  stop() {},
};

class LineProgress implements Progress {
  private total = 0;
  private n = 0;
  start(total: number): void {
    this.total = total;
    this.n = 0;
  }
  step(label: string): void {
    this.n++;
    process.stderr.write(`compare: [${this.n}/${this.total}] ${label}\n`);
  }
  detail(): void {}
  note(text: string): void {
    process.stderr.write(`compare: ${text}\n`);
  }
  stop(): void {}
}

class BarProgress implements Progress {
  private bar = new SingleBar(
    {
      format: 'compare [{bar}] {value}/{total} {label} {detail}',
      stream: process.stderr,
      hideCursor: true,
      clearOnComplete: true,
      barsize: 24,
      fps: 10,
    },
    Presets.shades_classic,
  );
  private n = 0;
  private label = '';
  start(total: number): void {
    this.bar.start(total, 0, { label: '', detail: '' });
  }
  step(label: string): void {
    this.label = label;
    this.bar.update(this.n++, { label, detail: '' });
  }
  detail(text: string): void {
    this.bar.update(Math.max(0, this.n - 1), { label: this.label, detail: text });
  }
  note(text: string): void {
    this.bar.stop();
    process.stderr.write(`compare: ${text}\n`);
    this.bar.start(this.bar.getTotal(), Math.max(0, this.n - 1), { label: this.label, detail: '' });
  }
  stop(): void {
    this.bar.update(this.n, { label: 'done', detail: '' });
    this.bar.stop();
  }
}

export function stderrProgress(): Progress {
  return process.stderr.isTTY ? new BarProgress() : new LineProgress();
}
