// A bar chart over time (uPlot, canvas). uPlot's stylesheet comes through app.css; uPlot sets
// element.style from script, which the CSP allows (it blocks only style attributes in markup).
// The canvas is hidden from screen readers: the caption and the table beside it carry the numbers.
import uPlot from "uplot";
import "uplot/dist/uPlot.min.css";
import { useEffect, useRef } from "preact/hooks";

export interface ChartProps {
  /** Bucket starts, seconds since the epoch. */
  x: number[];
  values: number[];
  /** The series' name in the legend, with its unit: "Requests", "Tokens", "Cost (USD)". */
  label: string;
  /** The y axis's label: the unit ("requests", "tokens", "USD"). */
  unit: string;
  /** A value as the legend shows it, with its unit. */
  format: (v: number) => string;
  /** A short axis tick. */
  tick: (v: number) => string;
  /** The legend's time for a bucket (and its UTC). */
  when: (t: number) => string;
  /** Days are UTC days: draw the time axis in UTC. */
  utc: boolean;
  /** Counts: whole-number ticks only. */
  integer?: boolean;
  color?: string;
}

/** 1, 2, 5, 10, 20, 50, … up to 5e15: tick steps for counts. */
const WHOLE_STEPS = Array.from({ length: 16 }, (_, i) => [1, 2, 5].map((m) => m * 10 ** i)).flat();

const HEIGHT = 240;

export function Chart(props: ChartProps) {
  const box = useRef<HTMLDivElement>(null);
  useEffect(() => {
    const el = box.current!;
    const width = () => Math.max(260, el.clientWidth);
    const color = props.color ?? "#1f5fbf";
    const bucket = props.x.length > 1 ? props.x[1] - props.x[0] : 3600;
    const plot = new uPlot(
      {
        width: width(),
        height: HEIGHT,
        tzDate: props.utc ? (ts) => uPlot.tzDate(new Date(ts * 1000), "Etc/UTC") : undefined,
        scales: {
          // Half a bucket either side so the first and last bars are whole.
          x: { time: true, range: (_u, min, max) => [min - bucket / 2, max + bucket / 2] },
          y: { range: (_u, _min, max) => [0, max > 0 ? max * 1.1 : 1] },
        },
        cursor: { y: false, points: { show: false } },
        legend: { live: true },
        axes: [
          { stroke: "#5b6676", grid: { stroke: "#eceff3" }, ticks: { stroke: "#d9dee5" } },
          {
            stroke: "#5b6676",
            label: props.unit,
            labelSize: 18,
            size: 56,
            grid: { stroke: "#eceff3" },
            ticks: { stroke: "#d9dee5" },
            values: (_u, splits) => splits.map(props.tick),
            incrs: props.integer ? WHOLE_STEPS : undefined,
          },
        ],
        series: [
          { label: "Time", value: (_u, t) => (t == null ? "—" : props.when(t)) },
          {
            label: props.label,
            stroke: color,
            fill: `${color}cc`,
            width: 1,
            paths: uPlot.paths.bars!({ size: [0.7, 40], align: 0 }),
            points: { show: false },
            value: (_u, v) => (v == null ? "—" : props.format(v)),
          },
        ],
      },
      [props.x, props.values],
      el,
    );
    const ro = new ResizeObserver(() => {
      if (plot.width !== width()) plot.setSize({ width: width(), height: HEIGHT });
    });
    ro.observe(el);
    return () => {
      ro.disconnect();
      plot.destroy();
    };
  }, [props.x, props.values, props.label, props.utc, props.integer]);
  return <div ref={box} class="chart-canvas" aria-hidden="true" />;
}
