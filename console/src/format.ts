// Numbers with their units, money in USD, times in the browser's zone (UTC on hover).
import { timestampDate, type Timestamp } from "@bufbuild/protobuf/wkt";

const intFmt = new Intl.NumberFormat(undefined, { maximumFractionDigits: 0 });

export function int(n: bigint | number | undefined): string {
  if (n === undefined) return "0";
  return typeof n === "bigint" ? n.toLocaleString() : intFmt.format(n);
}

export function plural(n: bigint | number, one: string, many = `${one}s`): string {
  return `${int(n)} ${BigInt(n) === 1n ? one : many}`;
}

export const tokens = (n: bigint | number | undefined) => plural(n ?? 0, "token");
export const requests = (n: bigint | number | undefined) => plural(n ?? 0, "request");

/** A decimal USD string ("12.5", "0.000123") as "$12.50 USD"; small amounts keep their digits. */
export function usd(s: string | undefined): string {
  const v = Number(s || "0");
  if (!Number.isFinite(v)) return `${s} USD`;
  const a = Math.abs(v);
  const digits = a === 0 || a >= 1 ? 2 : a >= 0.01 ? 4 : 6;
  return `$${v.toLocaleString(undefined, { minimumFractionDigits: 2, maximumFractionDigits: digits })} USD`;
}

export function toDate(ts: Timestamp | undefined): Date | undefined {
  return ts ? timestampDate(ts) : undefined;
}

const dateTime = new Intl.DateTimeFormat(undefined, { dateStyle: "medium", timeStyle: "short" });
const dateOnly = new Intl.DateTimeFormat(undefined, { dateStyle: "medium" });

export function localTime(d: Date, withTime = true): string {
  return (withTime ? dateTime : dateOnly).format(d);
}

export function utcTitle(d: Date): string {
  return `${d.toISOString().replace("T", " ").replace(/\.\d+Z$/, "")} UTC`;
}

export const zoneName = Intl.DateTimeFormat().resolvedOptions().timeZone || "local time";

/** "in 3 days", "5 minutes ago". */
export function relative(d: Date, now = Date.now()): string {
  const diff = d.getTime() - now;
  const abs = Math.abs(diff);
  const rtf = new Intl.RelativeTimeFormat(undefined, { numeric: "auto" });
  const units: [Intl.RelativeTimeFormatUnit, number][] = [
    ["day", 86_400_000],
    ["hour", 3_600_000],
    ["minute", 60_000],
  ];
  for (const [unit, ms] of units) if (abs >= ms) return rtf.format(Math.round(diff / ms), unit);
  return diff < 0 ? "just now" : "in under a minute";
}

export const WEEK_MS = 7 * 86_400_000;

/** A datetime-local input's value for `d`, in the browser's zone. */
export function localInputValue(d: Date): string {
  const pad = (n: number) => String(n).padStart(2, "0");
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())}T${pad(d.getHours())}:${pad(d.getMinutes())}`;
}
